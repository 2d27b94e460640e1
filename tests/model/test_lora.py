"""LoRA (model/lora.py): both key layouts, unmerged scales, fusing, fp8 weights, streamed blocks, errors.

Every adapter here is written by the test itself with the published key names, not by the module under test.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from framepack_rt import FramePackTransformer
from framepack_rt.model.lora import LoraError, LoraSet, parse_lora_spec, read_lora
from framepack_rt.model.offload import BlockStreamer, all_blocks, plan_residency, region_bytes
from framepack_rt.model.quantize import Fp8Linear, quantize_blocks

# Layers of each kind (double-stream attention and FF, context stream, AdaLN, single-stream MLP and output).
TARGETS = ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj",
           "transformer_blocks.1.ff.net.0.proj", "transformer_blocks.1.ff_context.net.2",
           "transformer_blocks.0.norm1.linear", "single_transformer_blocks.0.proj_mlp",
           "single_transformer_blocks.1.proj_out", "single_transformer_blocks.1.attn.to_v")


def random_adapter(model, rank=4, seed=0, targets=TARGETS, size=0.3):
    """module -> (down (rank, in), up (out, rank)), big enough to change the output clearly."""
    g = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    return {name: (torch.randn(rank, modules[name].in_features, generator=g) * size,
                   torch.randn(modules[name].out_features, rank, generator=g) * size) for name in targets}


def write_adapter(path, adapter, alpha, key, down, up):
    """One adapter file: per module ``key(name).{down,up}.weight`` and, given ``alpha``, ``key(name).alpha``."""
    state = {}
    for name, (down_w, up_w) in adapter.items():
        stem = key(name)
        state[f"{stem}.{down}.weight"] = down_w.clone()
        state[f"{stem}.{up}.weight"] = up_w.clone()
        if alpha is not None:
            state[f"{stem}.alpha"] = torch.tensor(float(alpha))
    save_file(state, str(path))
    return path


def write_peft(path, adapter, alpha=None, prefix="transformer."):
    return write_adapter(path, adapter, alpha, lambda name: prefix + name, "lora_A", "lora_B")


def write_kohya(path, adapter, alpha=None):
    return write_adapter(path, adapter, alpha, lambda name: "lora_unet_" + name.replace(".", "_"),
                         "lora_down", "lora_up")


def merged(model, adapters_and_scales):
    """A copy of ``model`` with scale * factor * up @ down added to each weight by hand (the oracle)."""
    copy = FramePackTransformer.from_config(model.config).eval()
    copy.load_state_dict(model.state_dict())
    modules = dict(copy.named_modules())
    with torch.no_grad():
        for adapter, scale in adapters_and_scales:
            for name, (down, up) in adapter.items():
                modules[name].weight += scale * up @ down
    return copy


@pytest.fixture
def model():
    return FramePackTransformer.from_config("tiny").eval()


@torch.no_grad()
def test_scale_zero_equals_no_lora(model, make_inputs, tmp_path):
    inputs = make_inputs(model.config, text_lengths=(6, 9))
    plain = model(**inputs)
    loras = LoraSet(model)
    loras.load(write_peft(tmp_path / "a.safetensors", random_adapter(model)), scale=0.0)
    loras.load(write_kohya(tmp_path / "b.safetensors", random_adapter(model, seed=1), alpha=2), scale=0.0)
    assert torch.equal(model(**inputs), plain)
    loras.set_scales({"a": 1.0})
    assert not torch.allclose(model(**inputs), plain, atol=1e-3)
    loras.set_scales({"a": 0.0})
    assert torch.equal(model(**inputs), plain)
    loras.fuse()  # fused at scale 0: the weights do not move
    assert torch.equal(model(**inputs), plain)


@pytest.mark.parametrize("alpha", [None, 2.0], ids=["no-alpha", "alpha-2-rank-4"])
@torch.no_grad()
def test_both_formats_of_one_adapter_give_the_same_output(model, make_inputs, tmp_path, alpha):
    inputs = make_inputs(model.config)
    adapter = random_adapter(model)
    # PEFT without alpha means scaling 1; kohya without alpha means alpha = rank: also 1.
    peft = read_lora(write_peft(tmp_path / "p.safetensors", adapter, alpha=alpha), model)
    kohya = read_lora(write_kohya(tmp_path / "k.safetensors", adapter, alpha=alpha), model)
    assert (peft.format, kohya.format) == ("peft", "kohya")
    assert sorted(layer.module for layer in kohya.layers) == sorted(TARGETS)
    outputs = []
    for file in (peft, kohya):
        loras = LoraSet(model)
        loras.load(file.path, scale=0.7)
        outputs.append(model(**inputs))
        loras.detach()
    assert torch.equal(outputs[0], outputs[1])
    factor = 1.0 if alpha is None else alpha / 4
    torch.testing.assert_close(outputs[0], merged(model, [(adapter, 0.7 * factor)])(**inputs), rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_adapters_stack_and_scales_change_live(model, make_inputs, tmp_path):
    inputs = make_inputs(model.config)
    a, b = random_adapter(model, seed=1), random_adapter(model, seed=2, targets=TARGETS[::2], rank=2)
    loras = LoraSet(model)
    assert loras.load(write_peft(tmp_path / "style.safetensors", a, prefix="")) == "style"
    assert loras.load(write_kohya(tmp_path / "motion.safetensors", b), scale=-0.5, name="move") == "move"
    torch.testing.assert_close(model(**inputs), merged(model, [(a, 1.0), (b, -0.5)])(**inputs), rtol=1e-4, atol=1e-4)
    loras.set_scales({"style": 0.25})
    assert loras.scales == {"style": 0.25, "move": -0.5}
    torch.testing.assert_close(model(**inputs), merged(model, [(a, 0.25), (b, -0.5)])(**inputs), rtol=1e-4, atol=1e-4)
    assert [d["name"] for d in loras.describe()] == ["style", "move"]


@torch.no_grad()
def test_fused_equals_unmerged_and_fixes_the_scales(model, make_inputs, tmp_path):
    inputs = make_inputs(model.config)
    loras = LoraSet(model)
    loras.load(write_peft(tmp_path / "a.safetensors", random_adapter(model), alpha=8), scale=0.6)
    unmerged = model(**inputs)
    loras.fuse()
    assert not model.transformer_blocks[0].attn.to_q._forward_hooks  # nothing left per call
    torch.testing.assert_close(model(**inputs), unmerged, rtol=1e-4, atol=1e-4)
    loras.set_scales({"a": 0.6})  # unchanged: fine
    with pytest.raises(LoraError, match="fused.*fixed at 0.6"):
        loras.set_scales({"a": 1.0})


@torch.no_grad()
def test_fp8_weights_take_lora_unmerged_and_fused(make_inputs, tmp_path):
    model = FramePackTransformer.from_config("tiny").to(torch.bfloat16).eval()
    quantize_blocks(model)
    assert isinstance(model.transformer_blocks[0].attn.to_q, Fp8Linear)
    inputs = make_inputs(model.config, dtype=torch.bfloat16)
    plain = model(**inputs)
    adapter = random_adapter(model)
    loras = LoraSet(model)
    loras.load(write_kohya(tmp_path / "a.safetensors", adapter), scale=1.0)
    assert loras._hooks["transformer_blocks.0.attn.to_q"].adapters["a"][0].dtype == torch.bfloat16
    unmerged = model(**inputs)
    # The oracle: each adapted fp8 layer's dequantized weight plus the delta, as a plain bf16 Linear.
    oracle = FramePackTransformer.from_config("tiny").to(torch.bfloat16).eval()
    quantize_blocks(oracle)
    oracle.load_state_dict(model.state_dict())
    modules = dict(oracle.named_modules())
    for name, (down, up) in adapter.items():
        layer = modules[name]
        parent, _, child = name.rpartition(".")
        linear = torch.nn.Linear(layer.in_features, layer.out_features, dtype=torch.bfloat16)
        linear.weight.copy_((layer.dequantized().float() + up @ down).to(torch.bfloat16))
        linear.bias.copy_(layer.bias)
        setattr(oracle.get_submodule(parent), child, linear)
    want = oracle(**inputs)
    error = lambda got: ((got.float() - want.float()).norm() / want.float().norm()).item()  # noqa: E731
    assert error(plain) > 0.05  # the adapter matters ...
    assert error(unmerged) < 0.02  # ... and unmerged it is bf16-close to the exact sum
    loras.fuse()  # requantized: fp8 rounding of the summed weight
    assert model.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    assert error(model(**inputs)) < 0.05, error(model(**inputs))


@torch.no_grad()
def test_streamed_blocks_take_lora_unmerged_and_fused(make_inputs, tmp_path):
    inputs = make_inputs(FramePackTransformer.from_config("tiny").config)
    adapter = random_adapter(FramePackTransformer.from_config("tiny"))
    path = write_peft(tmp_path / "a.safetensors", adapter, alpha=2)
    reference = FramePackTransformer.from_config("tiny").eval()
    LoraSet(reference).load(path, scale=0.8)
    want = reference(**inputs)
    for fuse in (False, True):
        model = FramePackTransformer.from_config("tiny").eval()
        base = plan_residency(model, 10**12).base_bytes
        streamer = BlockStreamer(model, "cpu", base + 2 * max(region_bytes(b) for b in all_blocks(model)))
        assert streamer.streamed, "the budget must stream some blocks"
        loras = LoraSet(model, device="cpu")
        loras.load(path, scale=0.8)
        if fuse:
            loras.fuse()  # into the host arena, before any block was copied in
        for _ in range(2):
            torch.testing.assert_close(model(**inputs), want, rtol=1e-4, atol=1e-4)
        streamer.detach()


def test_a_key_that_matches_nothing_is_named(model, tmp_path):
    adapter = random_adapter(model, targets=TARGETS[:2])
    adapter["transformer_blocks.0.attn.to_qq"] = adapter[TARGETS[0]]
    with pytest.raises(LoraError, match=r"'transformer\.transformer_blocks\.0\.attn\.to_qq\.lora_A\.weight' matches no"):
        read_lora(write_peft(tmp_path / "p.safetensors", adapter), model)
    with pytest.raises(LoraError, match=r"'lora_unet_transformer_blocks_0_attn_to_qq\.lora_down\.weight' matches no"):
        read_lora(write_kohya(tmp_path / "k.safetensors", adapter), model)
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 32)},
              str(tmp_path / "hy.safetensors"))
    with pytest.raises(LoraError, match="double_blocks_0_img_attn_qkv.*not mapped"):
        read_lora(tmp_path / "hy.safetensors", model)
    save_file({"transformer.x_embedder.proj.lora_A.weight": torch.zeros(2, 32),
               "transformer.x_embedder.proj.lora_B.weight": torch.zeros(32, 2)}, str(tmp_path / "conv.safetensors"))
    with pytest.raises(LoraError, match="x_embedder.proj, a Conv3d: only linear"):
        read_lora(tmp_path / "conv.safetensors", model)
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector": torch.zeros(32),
               "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 32)},
              str(tmp_path / "dora.safetensors"))
    with pytest.raises(LoraError, match="lora_magnitude_vector' is not a LoRA weight"):
        read_lora(tmp_path / "dora.safetensors", model)


def test_a_wrong_shape_is_named(model, tmp_path):
    adapter = random_adapter(model, targets=TARGETS[:3])
    down, up = adapter[TARGETS[1]]
    adapter[TARGETS[1]] = (down[:, :-1], up)
    with pytest.raises(LoraError, match=r"'lora_unet_transformer_blocks_0_attn_add_k_proj\.lora_down\.weight' has "
                                        r"shape \(4, 31\), transformer_blocks.0.attn.add_k_proj needs \(rank, 32\)"):
        read_lora(write_kohya(tmp_path / "k.safetensors", adapter), model)
    adapter[TARGETS[1]] = (down, up[:, :3])
    with pytest.raises(LoraError, match=r"add_k_proj\.lora_B\.weight' has shape \(32, 3\).*needs \(32, 4\)"):
        read_lora(write_peft(tmp_path / "p.safetensors", adapter), model)
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 32)},
              str(tmp_path / "half.safetensors"))
    with pytest.raises(LoraError, match="to_q.lora_A.weight' has no matching up weight"):
        read_lora(tmp_path / "half.safetensors", model)


def test_names_and_scales_are_checked(model, tmp_path):
    loras = LoraSet(model)
    path = write_peft(tmp_path / "a.safetensors", random_adapter(model, targets=TARGETS[:1]))
    loras.load(path)
    with pytest.raises(LoraError, match="no LoRA named 'b'; loaded: a"):
        loras.set_scales({"b": 1.0})
    for bad in (float("nan"), 4.5, "1", True):
        with pytest.raises(LoraError, match="scale"):
            loras.set_scales({"a": bad})
    with pytest.raises(LoraError, match="named 'a' is loaded already"):
        loras.load(path)


def test_lora_spec_parses_scale_from_the_last_colon_only_when_numeric(tmp_path):
    path = write_peft(tmp_path / "a.safetensors", {})
    assert parse_lora_spec(str(path)) == (path, 1.0)
    assert parse_lora_spec(f"{path}:0.5") == (path, 0.5)
    assert parse_lora_spec(f"{path}:-1") == (path, -1.0)
    drive = tmp_path / "C:"  # a folder named like a drive: the colon belongs to the path
    drive.mkdir()
    (drive / "b.safetensors").write_bytes(path.read_bytes())
    assert parse_lora_spec(f"{drive}/b.safetensors") == (drive / "b.safetensors", 1.0)
    assert parse_lora_spec(f"{drive}/b.safetensors:2") == (drive / "b.safetensors", 2.0)
    with pytest.raises(LoraError, match="no file .*missing.safetensors"):
        parse_lora_spec(str(tmp_path / "missing.safetensors:0.5"))
    with pytest.raises(LoraError, match="out of range"):
        parse_lora_spec(f"{path}:9")
    with pytest.raises(LoraError, match="no file"):
        parse_lora_spec(f"{path}:abc")  # not a number: part of the path, and no such file


def test_unmerged_adapters_keep_the_step_one_graph(model, make_inputs, tmp_path):
    """The adapters' hooks trace with the step (torch.compile sees one graph, as without LoRA)."""
    inputs = make_inputs(model.config, text_lengths=(6, 11))
    LoraSet(model).load(write_kohya(tmp_path / "a.safetensors", random_adapter(model), alpha=2), scale=0.5)
    x = inputs["hidden_states"]
    prepare = {k: v for k, v in inputs.items() if k not in ("hidden_states", "timestep", "guidance")}
    with torch.no_grad():
        plan = model.prepare((x.shape[0], *x.shape[2:]), **prepare)
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(model.step)(plan, x, inputs["timestep"], inputs["guidance"])
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
