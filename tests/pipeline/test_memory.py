"""The memory estimate, on the CPU: parameters counted on meta-device models built from config.json files (the
release's sizes, no weights anywhere), bytes by dtype, and the one-line error with the setting that fits."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
import torch

from framepack_rt.model.config import FramePackConfig
from framepack_rt.pipeline import memory
from framepack_rt.pipeline.devices import Placement
from framepack_rt.pipeline.memory import GiB, InsufficientMemory, ensure_fits, estimate_folders

TRANSFORMER_13B = 12_874_314_816  # FramePackTransformer.from_config("framepack-13b"): the release's count
LLAMA_3_8B_BODY = 7_505_186_816  # LlamaModel of llava-llama-3-8b (Llama-3-8B's 8.03 B less the 525 M lm_head)


@pytest.fixture(scope="module")
def release_configs(tmp_path_factory):
    """Folders holding only the released parts' config.json (HunyuanVideo's LLaMA and CLIP-L text encoders,
    flux_redux's SigLIP, the HunyuanVideo VAE, FramePackI2V_HY's transformer)."""
    from diffusers import AutoencoderKLHunyuanVideo
    from transformers import CLIPTextConfig, LlamaConfig, SiglipVisionConfig

    root = tmp_path_factory.mktemp("release")
    LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128320, max_position_embeddings=8192,
                rope_theta=500000.0).save_pretrained(root / "text_encoder")
    CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   projection_dim=768, vocab_size=49408,
                   max_position_embeddings=77).save_pretrained(root / "text_encoder_2")
    SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                       image_size=384, patch_size=14).save_pretrained(root / "image_encoder")
    with torch.device("meta"):
        AutoencoderKLHunyuanVideo().save_config(root / "vae")  # diffusers' defaults are the released VAE's
    (root / "transformer").mkdir()
    config = FramePackConfig.preset("framepack-13b").to_json_dict()
    (root / "transformer" / "config.json").write_text(json.dumps(config))
    return {part: root / part for part in memory.WEIGHT_PARTS}


@pytest.fixture(scope="module")
def cpu_fp32(release_configs):
    return estimate_folders(release_configs, Placement(torch.device("cpu")))


def test_counts_the_released_sizes_on_the_meta_device(cpu_fp32):
    transformer, llama = cpu_fp32.part("transformer"), cpu_fp32.part("text_encoder")
    assert transformer.numel == TRANSFORMER_13B and transformer.dtype == torch.float32
    assert transformer.nbytes == 4 * TRANSFORMER_13B  # 51.5 GB: the out-of-memory kill
    assert llama.numel == LLAMA_3_8B_BODY + 128  # + the rotary inv_freq buffers (64 + 64)
    assert all(p.counted_by == "meta-device model from config.json" for p in cpu_fp32.parts)
    # On top of the weights: the plan's worst phase at 640x640 (here the VAE's whole-frame decode in fp32)
    plan = cpu_fp32.plan
    assert (plan.height, plan.width, plan.window, plan.workspace) == (640, 640, 9, 0)  # no cuBLAS workspace on a CPU
    assert cpu_fp32.needed_bytes == cpu_fp32.weights_bytes + max(plan.step_bytes, plan.vae_decode)
    assert 80e9 < cpu_fp32.weights_bytes < 90e9


def test_gpu_auto_dtypes_halve_the_bytes(release_configs):
    gpu = estimate_folders(release_configs, Placement(torch.device("cuda", 0), torch.bfloat16))
    assert gpu.part("transformer").nbytes == 2 * TRANSFORMER_13B
    cpu = estimate_folders(release_configs, Placement(torch.device("cpu")))
    integers = sum(p.other_bytes for p in gpu.parts)  # integer buffers (CLIP's position ids) keep their size
    assert 2 * (gpu.weights_bytes - integers) == cpu.weights_bytes - integers
    # The least low-VRAM budget: the non-block weights plus two block-sized slots to stream through.
    from framepack_rt.model.transformer import FramePackTransformer

    meta = FramePackTransformer.from_config("framepack-13b", device="meta", dtype=torch.bfloat16)
    blocks = [*meta.transformer_blocks, *meta.single_transformer_blocks]
    block_bytes = [sum(p.nbytes for p in b.parameters()) for b in blocks]
    non_block = sum(p.nbytes for p in meta.parameters()) - sum(block_bytes)
    assert gpu.min_budget_bytes == non_block + 2 * max(block_bytes)
    assert 1 * GiB < gpu.min_budget_bytes < 3 * GiB


def test_fits_when_free_memory_holds_it(cpu_fp32):
    checked = ensure_fits(replace(cpu_fp32, free_bytes=200 * GiB, host_free_bytes=200 * GiB))
    assert checked.fits() is True


def test_cpu_fp32_too_big_names_bf16(cpu_fp32):
    with pytest.raises(InsufficientMemory) as err:
        ensure_fits(replace(cpu_fp32, free_bytes=60 * GiB, host_free_bytes=60 * GiB))
    line = str(err.value)
    assert len(line.splitlines()) == 1
    assert re.search(r"needs 1\d\d\.\d GiB on cpu", line) and "60.0 GiB free" in line
    assert "use --dtype bf16 (needs 5" in line


def _suggested_budget(line: str) -> float:
    match = re.search(r"--low-vram --memory-budget-gb ([\d.]+)", line)
    assert match, line
    return float(match.group(1))


@pytest.mark.parametrize("free_gib", [40, 24])
def test_a_smaller_gpu_gets_a_low_vram_budget_that_fits(release_configs, free_gib):
    placement = Placement(torch.device("cuda", 0), torch.bfloat16)
    full = estimate_folders(release_configs, placement)
    with pytest.raises(InsufficientMemory) as err:
        ensure_fits(replace(full, free_bytes=free_gib * GiB, host_free_bytes=64 * GiB))
    budget = _suggested_budget(str(err.value))
    assert f"{free_gib}.0 GiB free" in str(err.value)
    low = estimate_folders(release_configs, placement, low_vram=True, budget_bytes=int(budget * GiB))
    assert low.needed_bytes <= free_gib * GiB  # the suggestion really fits
    assert ensure_fits(replace(low, free_bytes=free_gib * GiB, host_free_bytes=64 * GiB)).fits()
    # The budget is the whole card, and the plan fills it: blocks stream only while the card is nearly full
    assert budget == free_gib
    assert low.needed_bytes > (free_gib - 1) * GiB or not low.plan.weights.streamed_blocks


def test_an_8_gb_gpu_runs_the_encoders_on_the_cpu(release_configs):
    # The 8B LLaMA (14 GiB in bf16) cannot load on an 8 GiB card: low-VRAM mode runs the encoders on the CPU and
    # gives the card to the transformer's blocks, the VAE and one step's activations.
    placement = Placement(torch.device("cuda", 0), torch.bfloat16)
    gpu = estimate_folders(release_configs, placement)
    with pytest.raises(InsufficientMemory, match=r"use --low-vram --memory-budget-gb 8 \(needs 7\.\d GiB and "
                                                 r"3\d\.\d GiB of host RAM, encoders on the CPU\)"):
        ensure_fits(replace(gpu, free_bytes=8 * GiB, host_free_bytes=64 * GiB))
    low = estimate_folders(release_configs, placement, low_vram=True, budget_bytes=8 * GiB)
    assert low.encoders_on_cpu and low.needed_bytes <= 8 * GiB and low.plan.weights.streamed_blocks
    assert low.streamer_budget_bytes == 8 * GiB - low.plan.non_weight_bytes  # the blocks get what is left
    roomy = estimate_folders(release_configs, placement, low_vram=True, budget_bytes=24 * GiB)
    assert not roomy.encoders_on_cpu and roomy.needed_bytes <= 24 * GiB  # the LLaMA fits beside the rest


def test_nothing_fits_says_so(release_configs):
    # 2 GiB cannot hold one step's activations at 640x640 beside the non-block weights and two block slots.
    gpu = estimate_folders(release_configs, Placement(torch.device("cuda", 0), torch.bfloat16))
    with pytest.raises(InsufficientMemory, match=r"nothing fits: a budget of 2\.0\d? GiB cannot run this"):
        ensure_fits(replace(gpu, free_bytes=2 * GiB, host_free_bytes=64 * GiB))
    low = estimate_folders(release_configs, Placement(torch.device("cuda", 0), torch.bfloat16), low_vram=True,
                           budget_bytes=2 * GiB)
    assert low.fits() is False and "at least" in low.plan_error and low.min_budget_bytes > 2 * GiB


def test_low_vram_host_ram(release_configs):
    low = estimate_folders(release_configs, Placement(torch.device("cuda", 0), torch.bfloat16), low_vram=True)
    # The transformer's master copy and, with the encoders on the CPU at 6 GiB, the largest of them
    llama = low.part("text_encoder").nbytes
    assert low.budget_bytes == int(memory.DEFAULT_BUDGET_GB * GiB) and low.encoders_on_cpu
    assert low.host_bytes == 2 * TRANSFORMER_13B + llama
    with pytest.raises(InsufficientMemory, match="host RAM: it needs 38.0 GiB, 16.0 GiB is available"):
        ensure_fits(replace(low, free_bytes=24 * GiB, host_free_bytes=16 * GiB))


def test_meta_count_matches_the_safetensors_headers():
    from framepack_rt.pipeline.builtin import demo_weights_dir

    for part in memory.WEIGHT_PARTS:
        meta_floats, _, how = memory.count_part(part, demo_weights_dir() / part)
        stored_floats, _ = memory.safetensors_numel(demo_weights_dir() / part)
        assert how.startswith("meta-device")
        assert stored_floats <= meta_floats <= stored_floats + 256, part  # + non-persistent buffers (RoPE)


def test_a_config_that_does_not_build_falls_back_to_the_headers(tmp_path):
    from framepack_rt.pipeline.builtin import demo_weights_dir

    folder = tmp_path / "vae"
    folder.mkdir()
    source = demo_weights_dir() / "vae"
    broken = {"_class_name": "AutoencoderKLHunyuanVideo", "layers_per_block": "x"}
    (folder / "config.json").write_text(json.dumps(broken))
    (folder / "diffusion_pytorch_model.safetensors").symlink_to(source / "diffusion_pytorch_model.safetensors")
    floats, _, how = memory.count_part("vae", folder)
    assert how.startswith("safetensors headers") and floats == memory.safetensors_numel(source)[0]


def test_free_memory_on_this_cpu():
    available = memory.host_available_bytes()
    assert available is not None and 0 < available < 2**50
    measured = memory.with_free_memory(estimate_folders({}, Placement(torch.device("cpu"))))
    assert measured.free_bytes and measured.host_free_bytes


def test_from_pretrained_stops_before_loading(monkeypatch):
    from framepack_rt.pipeline.framepack_pipeline import FramePackPipeline

    monkeypatch.setattr(memory, "host_available_bytes", lambda: 16 * 2**20)  # 16 MiB left on this "machine"
    with pytest.raises(InsufficientMemory, match=r"needs \d+\.\d MiB on cpu .* at 96x96, window 9, 16\.0 MiB free"):
        FramePackPipeline.from_pretrained("demo", device="cpu")
    FramePackPipeline.from_pretrained("demo", device="cpu", check_memory=False)  # the check was all that stopped it


def test_fp8_blocks_are_counted_at_one_byte(release_configs):
    from framepack_rt.model.memory_plan import count_weights

    placement = Placement(torch.device("cuda", 0), torch.bfloat16)
    bf16 = estimate_folders(release_configs, placement)
    fp8 = estimate_folders(release_configs, placement, quantize="fp8")
    config = FramePackConfig.preset("framepack-13b")
    assert fp8.part("transformer").nbytes == count_weights(config, torch.bfloat16, "fp8").total
    assert 0.5 < fp8.part("transformer").nbytes / bf16.part("transformer").nbytes < 0.56  # ~13 GB of ~26 GB
    assert fp8.plan.quantize == "fp8" and fp8.needed_bytes < bf16.needed_bytes - 11 * GiB
    assert "fp8 blocks" in fp8.summary()
    # A low-VRAM budget streams fewer bytes per step in fp8
    low = dict(low_vram=True, budget_bytes=12 * GiB)
    assert (estimate_folders(release_configs, placement, quantize="fp8", **low).plan.streamed_bytes
            < estimate_folders(release_configs, placement, **low).plan.streamed_bytes)


def test_encoders_on_the_cpu_beside_a_gpu_load_in_bf16(tmp_path):
    from framepack_rt.pipeline.model_folders import ModelLoader, resolve_model_paths
    from framepack_rt.pipeline.tiny_models import write_tiny_models

    write_tiny_models(tmp_path)
    paths = resolve_model_paths(tmp_path)
    beside = ModelLoader(paths, device=torch.device("cuda", 0), encoder_device=torch.device("cpu"))  # no CUDA call
    assert beside._encoder_dtype("text_encoder", None) == torch.bfloat16  # fp16 on the GPU; bf16 on the CPU
    assert beside.dtype_for("vae") == torch.float16  # the VAE stays on the GPU in fp16
    encoder = ModelLoader(paths, device="cpu", encoder_device="cpu").text_encoder()
    assert encoder.device.type == "cpu"
