"""Kernels that check themselves (interpreted): a broken kernel is caught on its probe, warned about once, and
its op runs on torch, so the model's output with kernels forced on is the torch path's."""

from __future__ import annotations

import ast
import logging
import types

import pytest
import torch
import triton
import triton.language as tl
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources

from framepack_rt import FramePackTransformer
from framepack_rt.kernels import _common, adaln, dispatch, packed_attention, patchify, qk_norm_rope, selfcheck
from framepack_rt.kernels import use_kernels
from framepack_rt.model import attention
from framepack_rt.model.layers import RMSNorm
from framepack_rt.model.rope import apply_rope

CPU = torch.device("cpu")
SMALL = {  # shape classes of the tiny model: in_channels 16 (patchify: 4 here, faster), width 32, head_dim 16
    "patchify": (4, 32),
    "qk_norm_rope": (16,),
    "modulate": (32,),
    "residual_gate_modulate": (32,),
    "packed_attention": (16,),
}


@pytest.fixture(autouse=True)
def fresh_decisions(monkeypatch):
    """Every test starts and ends with no self-check or attention decision remembered."""
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.delenv(attention.ENV_VAR, raising=False)
    dispatch.reset_decisions()
    attention.SELECTOR.clear()
    yield
    dispatch.reset_decisions()
    attention.SELECTOR.clear()


def failure_warnings(caplog) -> list[str]:
    """The kernel named by each self-check warning logged so far."""
    return [
        r.args[0] for r in caplog.records
        if r.name == "framepack_rt.kernels" and r.levelno == logging.WARNING and "self-check" in r.msg
    ]


def off_by(fn, amount: float):
    """A launcher whose results are all ``amount`` off."""

    def wrong(*args, **kwargs):
        out = fn(*args, **kwargs)
        return tuple(t + amount for t in out) if isinstance(out, tuple) else out + amount

    return wrong


def raising(error: Exception):
    def launch(*args, **kwargs):
        raise error

    return launch


@triton.jit
def _broken_adaln_kernel(
    X, Y, Gate, Shift, Scale, XOut, ModOut, n_rows, dim, rows_per_vec,
    stride_x, stride_y, stride_gate, stride_shift, stride_scale, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    cols = tl.arange(0, 3)  # not a power of two: no compile on a GPU, an InterpreterError here
    tl.store(ModOut + cols, tl.zeros([3], dtype=tl.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_kernel_passes_its_probe(dtype):
    checks = selfcheck.check_all(CPU, dtype, SMALL)
    assert [c.name for c in checks] == list(selfcheck.KERNELS)
    for c in checks:
        assert c.ok, c
        assert c.reason == "passed" and c.shape == SMALL[c.name] and c.dtype == dtype and c.device == "cpu"
        assert 0 <= c.max_error <= c.tolerance
    assert selfcheck.check_all(CPU, dtype, SMALL) == checks  # remembered: the same results


def test_wrong_results_are_caught_warned_once_and_the_op_runs_on_torch(monkeypatch, caplog):
    monkeypatch.setattr(qk_norm_rope, "qk_norm_rope", off_by(qk_norm_rope.qk_norm_rope, 1e-3))
    with caplog.at_level(logging.WARNING, logger="framepack_rt.kernels"):
        first = selfcheck.check_kernel("qk_norm_rope", CPU, torch.float32, (16,))
        assert selfcheck.check_kernel("qk_norm_rope", CPU, torch.float32, (16,)) is first
        with use_kernels(True):
            plan = dispatch.kernel_plan(CPU, torch.float32, head_dim=16, dim=32, in_channels=4)
            assert dispatch.kernel_plan(CPU, torch.float32, head_dim=16, dim=32, in_channels=4) is plan
            norm = RMSNorm(16)
            g = torch.Generator().manual_seed(0)
            x = torch.randn(1, 6, 2, 16, generator=g)
            cos, sin = torch.randn(1, 6, 16, generator=g), torch.randn(1, 6, 16, generator=g)
            per_call = dispatch.norm_rope(x, norm, (cos, sin))
    assert not first.ok and first.reason.startswith("max error") and first.max_error > first.tolerance
    assert failure_warnings(caplog) == ["qk_norm_rope"]  # one warning, however often it is asked
    assert "the torch path runs instead" in caplog.records[0].getMessage()
    assert plan.norm_rope is dispatch.torch_norm_rope and "norm_rope" not in plan.fused
    assert plan.fused == {"patch_embed", "modulate", "residual_gate_modulate"}
    assert plan.modulate is dispatch.fused_modulate_op
    assert torch.equal(per_call, apply_rope(norm(x), cos, sin))  # the per-call path: the torch lines exactly


@pytest.mark.parametrize(
    "error",
    [
        OutOfResources(262144, 232448, "shared memory"),
        CompilationError("acc = tl.dot(q, k)", ast.Name("acc"), "incompatible dimensions"),
    ],
    ids=["out-of-resources", "compile-error"],
)
def test_launch_errors_are_caught_and_attention_falls_back_to_sdpa(monkeypatch, caplog, error):
    monkeypatch.setattr(packed_attention, "packed_attention", raising(error))
    with caplog.at_level(logging.WARNING, logger="framepack_rt.kernels"):
        check = selfcheck.check_kernel("packed_attention", CPU, torch.bfloat16, (16,))
        with use_kernels(True):
            choice = attention.attention_for(CPU, torch.bfloat16, 16, 70)
    assert not check.ok and check.reason.startswith(type(error).__name__)
    assert choice.name == "sdpa" and "failed its self-check" in choice.reason
    assert failure_warnings(caplog) == ["packed_attention"]


def test_a_deliberately_broken_kernel_is_caught(monkeypatch, caplog):
    monkeypatch.setattr(adaln, "_adaln_kernel", _broken_adaln_kernel)
    with caplog.at_level(logging.WARNING, logger="framepack_rt.kernels"):
        with use_kernels(True):
            plan = dispatch.kernel_plan(CPU, torch.float32, head_dim=16, dim=32, in_channels=4)
    assert plan.fused == {"patch_embed", "norm_rope"}
    assert sorted(failure_warnings(caplog)) == ["modulate", "residual_gate_modulate"]
    failed = {c.name: c for c in plan.checks if not c.ok}
    assert "arange's range must be a power of 2" in failed["modulate"].reason


@torch.no_grad()
def test_model_with_every_kernel_broken_equals_the_torch_path(monkeypatch, caplog, make_inputs, tiny_config):
    model = FramePackTransformer.from_config(tiny_config).eval()
    kwargs = make_inputs(tiny_config, text_lengths=(10, 6))
    reference = model(**kwargs)
    monkeypatch.setattr(patchify, "fused_patchify", off_by(patchify.fused_patchify, 0.5))
    monkeypatch.setattr(qk_norm_rope, "qk_norm_rope", raising(OutOfResources(1 << 20, 232448, "shared memory")))
    monkeypatch.setattr(adaln, "_adaln_kernel", _broken_adaln_kernel)
    monkeypatch.setattr(packed_attention, "packed_attention", off_by(packed_attention.packed_attention, 1e-2))
    with caplog.at_level(logging.WARNING, logger="framepack_rt.kernels"), use_kernels(True):
        got = model(**kwargs)
        again = model(**kwargs)
    assert torch.equal(got, reference) and torch.equal(again, reference)
    assert sorted(failure_warnings(caplog)) == sorted(selfcheck.KERNELS)  # once each, over two forwards


@torch.no_grad()
def test_model_with_one_broken_kernel_keeps_the_others(check, monkeypatch, make_inputs, tiny_config):
    model = FramePackTransformer.from_config(tiny_config).eval()
    kwargs = make_inputs(tiny_config, text_lengths=(10, 6))
    reference = model(**kwargs)
    monkeypatch.setattr(packed_attention, "packed_attention", off_by(packed_attention.packed_attention, 1e-2))
    with use_kernels(True):
        got = model(**kwargs)
        plan = dispatch.kernel_plan(CPU, torch.float32)
        choice = attention.attention_for(CPU, torch.float32, tiny_config.attention_head_dim, 64)
    assert plan.fused == set(dispatch.OPS)  # the other kernels still run
    assert choice.name == "sdpa"
    check(got, reference, scale=max(1.0, reference.abs().max().item()))


def test_unknown_kernel_name_explains():
    with pytest.raises(ValueError, match="the kernels are patchify"):
        selfcheck.check_kernel("softmax", CPU, torch.float32)


def test_interpret_flag_on_triton_before_and_after_knobs(monkeypatch):
    assert _common.interpret_enabled(triton) is True and _common.INTERPRET  # this process (conftest)
    old = types.ModuleType("triton")  # Triton 3.0-3.3: no triton.knobs, the variable decides
    old.__version__ = "3.2.0"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _common.interpret_enabled(old) is True
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _common.interpret_enabled(old) is False
    monkeypatch.delenv("TRITON_INTERPRET")
    assert _common.interpret_enabled(old) is False
    new = types.ModuleType("triton")  # 3.4+: the knob decides
    new.__version__ = "3.4.0+git1a2b3c"
    new.knobs = types.SimpleNamespace(runtime=types.SimpleNamespace(interpret=True))
    assert _common.interpret_enabled(new) is True
    assert (_common.triton_version(old), _common.triton_version(new)) == ((3, 2), (3, 4))


def props(major: int, minor: int, **reported) -> types.SimpleNamespace:
    return types.SimpleNamespace(major=major, minor=minor, name=f"sm_{major}{minor}", **reported)


def test_shared_memory_limit_per_architecture():
    assert _common.shared_bytes_limit(props(8, 0)) == 163 * 1024
    assert _common.shared_bytes_limit(props(8, 6)) == 99 * 1024
    assert _common.shared_bytes_limit(props(8, 9)) == 99 * 1024
    assert _common.shared_bytes_limit(props(9, 0)) == 227 * 1024 == _common.SM90_MAX_SHARED_BYTES
    assert _common.shared_bytes_limit(props(8, 9, shared_memory_per_block_optin=101000)) == 101000  # its own
    assert _common.shared_bytes_limit(props(11, 7)) == _common.UNKNOWN_GPU_SHARED_BYTES


@pytest.mark.parametrize("capability", [(8, 9), (8, 0), (9, 0)], ids=["sm89", "sm80", "sm90"])
def test_attention_configs_pruned_by_the_devices_own_limit(monkeypatch, capability):
    """The autotuner's prune hook, on a fake CUDA device: nothing over its limit, everything under it kept."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props(*capability))
    limit = _common.SHARED_BYTES_BY_CAPABILITY[capability]
    q = types.SimpleNamespace(device=torch.device("cuda", 0), element_size=lambda: 2)
    kept = packed_attention._early_prune(packed_attention.CONFIGS, {"Q": q, "seqlen_bucket": 32768}, HEAD_DIM=128)

    def smem(c) -> int:
        return packed_attention.shared_bytes_estimate(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages, 128, 2)

    assert {id(c) for c in kept} == {id(c) for c in packed_attention.CONFIGS if smem(c) <= limit}
    if capability == (8, 9):  # the 96 KiB tiles an RTX 4090 runs, 128 x 64 two-stage among them
        assert max(smem(c) for c in kept) == 96 * 1024
        assert any(c.kwargs["BLOCK_M"] == 128 and c.kwargs["BLOCK_N"] == 64 for c in kept)
    if capability == (9, 0):
        assert kept == packed_attention.CONFIGS


def test_aot_names_what_an_older_triton_lacks(monkeypatch, capsys):
    from framepack_rt.kernels import aot

    assert aot.missing_compiler_support() is None  # this Triton (3.9)

    class OldASTSource:  # Triton 3.0's signature: constants=, no constexprs=
        def __init__(self, fn, signature, constants=None, attrs=None) -> None: ...

    monkeypatch.setattr(triton.compiler, "ASTSource", OldASTSource)
    assert "ASTSource takes no constexprs=" in aot.missing_compiler_support()
    monkeypatch.delenv("TRITON_INTERPRET")  # past aot's interpreter check: the version guard answers
    assert aot.main(["--list"]) == 2
    assert "need a newer Triton" in capsys.readouterr().err


def test_report_prints_every_check_and_fails_with_a_broken_kernel(monkeypatch, capsys):
    from framepack_rt.kernels import aot, report

    monkeypatch.setattr(aot, "DIM", 32)  # the 13B's shapes, shrunk for the interpreter
    monkeypatch.setattr(aot, "HEAD_DIM", 16)
    assert report.main(["--dtype", "float32"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(selfcheck.KERNELS)
    assert all(": ok, max error" in line for line in lines)
    dispatch.reset_decisions()
    too_big = OutOfResources(1 << 18, 101376, "shared memory")
    monkeypatch.setattr(packed_attention, "packed_attention", raising(too_big))
    assert report.main(["--dtype", "float32"]) == 1
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("packed_attention") and "FAILED: OutOfResources: out of resource" in last
