"""--device / --dtype resolution: auto picks CUDA when there is one, dtypes follow the device, errors name the flag.

CUDA is simulated where a test needs one (torch.cuda's queries patched): the suite runs without a GPU.
"""

from __future__ import annotations

import argparse

import pytest
import torch

from framepack_rt.pipeline import devices
from framepack_rt.pipeline.devices import (
    DeviceError,
    Placement,
    check_memory_flags,
    part_dtype,
    resolve_device,
    resolve_dtype,
    resolve_placement,
)


@pytest.fixture
def fake_cuda(monkeypatch):
    """Two CUDA GPUs of compute capability ``capability`` (set on the returned object; default sm_90)."""

    class Fake:
        capability = (9, 0)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: Fake.capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    return Fake


def test_auto_is_the_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    placement = resolve_placement()
    assert placement.device == torch.device("cpu") and placement.dtype is None
    assert placement.compute_dtype == torch.float32


def test_auto_is_cuda_when_there_is_one(fake_cuda):
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)  # always with its index
    assert resolve_device("CUDA:1") == torch.device("cuda", 1)
    assert resolve_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")


def test_a_missing_cuda_index_names_the_ones_there(fake_cuda):
    with pytest.raises(DeviceError, match=r"2 CUDA device\(s\), cuda:0 to cuda:1"):
        resolve_device("cuda:2")


def test_cuda_without_a_gpu_says_what_to_pass(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="sees no CUDA GPU; use --device cpu"):
        resolve_device("cuda")


def test_mps_when_absent(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="MPS .* not available.*--device cpu"):
        resolve_device("mps")


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "cuda0", "meta", ""])
def test_unknown_device_names(spec):
    with pytest.raises(DeviceError, match="choose auto, cpu, cuda, cuda:N or mps"):
        resolve_device(spec)


def test_dtype_names_and_auto():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) is None and resolve_dtype(None, cpu) is None
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    assert resolve_dtype("FP16", cpu) == torch.float16
    assert resolve_dtype("float32", cpu) == torch.float32
    assert resolve_dtype(torch.float64, cpu) == torch.float64
    with pytest.raises(DeviceError, match="choose one of auto, bf16, fp16, fp32"):
        resolve_dtype("int8", cpu)


def test_auto_dtypes_per_part_follow_the_device(fake_cuda):
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert {part_dtype(p, cpu) for p in ("transformer", "text_encoder", "vae")} == {torch.float32}
    assert part_dtype("transformer", gpu) == torch.bfloat16  # sm_90 has bf16
    assert part_dtype("text_encoder", gpu) == part_dtype("vae", gpu) == torch.float16  # as the release runs them
    assert part_dtype("vae", gpu, torch.float32) == torch.float32  # a chosen dtype is every part's
    fake_cuda.capability = (7, 5)  # Turing: no bf16
    assert part_dtype("transformer", gpu) == torch.float16
    assert Placement(gpu).describe() == "cuda:0 (Fake GPU, sm_75), transformer fp16, encoders and VAE fp16"


def test_bf16_on_a_gpu_without_it_names_fp16(fake_cuda):
    fake_cuda.capability = (7, 5)
    with pytest.raises(DeviceError, match="sm_75.*has no bf16; use --dtype fp16"):
        resolve_placement("cuda", "bf16")
    assert resolve_placement("cuda", "fp16").compute_dtype == torch.float16


def test_flags_share_names_and_defaults():
    parser = argparse.ArgumentParser()
    devices.add_arguments(parser, memory=True)
    args = parser.parse_args([])
    assert (args.device, args.dtype, args.low_vram, args.memory_budget_gb) == ("auto", "auto", False, None)
    args = parser.parse_args(["--device", "CUDA:1", "--dtype", "BF16", "--low-vram", "--memory-budget-gb", "8"])
    assert (args.device, args.dtype, args.low_vram, args.memory_budget_gb) == ("cuda:1", "bf16", True, 8.0)
    for bad in (["--device", "gpu"], ["--dtype", "int8"], ["--memory-budget-gb", "0"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
    plain = argparse.ArgumentParser()
    devices.add_arguments(plain)
    assert not hasattr(plain.parse_args([]), "low_vram")


def test_a_budget_needs_low_vram():
    check_memory_flags(True, 4.0)
    check_memory_flags(False, None)
    with pytest.raises(DeviceError, match="add --low-vram"):
        check_memory_flags(False, 4.0)


def test_the_pipeline_resolves_auto(monkeypatch):
    from framepack_rt.pipeline.framepack_pipeline import FramePackPipeline

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    pipe = FramePackPipeline.from_pretrained("tiny")
    assert pipe.placement == Placement(torch.device("cpu"), torch.float32)
    assert pipe.parts.transformer().dtype == torch.float32
    with pytest.raises(DeviceError, match="tiny model runs in fp32"):
        FramePackPipeline.from_pretrained("tiny", dtype="bf16")
    with pytest.raises(DeviceError, match="add --low-vram"):
        FramePackPipeline.from_pretrained("tiny", memory_budget_gb=2)


def test_folder_loader_uses_the_same_rule(fake_cuda, tmp_path):
    from framepack_rt.pipeline.model_folders import ModelLoader, ModelPaths

    paths = ModelPaths(**{name: tmp_path for name in ModelPaths.__dataclass_fields__})
    gpu = ModelLoader(paths, device="cuda:0")
    assert gpu.dtype_for("transformer") == torch.bfloat16 and gpu.dtype_for("vae") == torch.float16
    assert gpu.dtype_for("vae", torch.float32) == torch.float32
    assert ModelLoader(paths, device="cpu").dtype_for("transformer") == torch.float32
    assert ModelLoader(paths, device="cuda:0", dtype=torch.float16).dtype_for("transformer") == torch.float16
