"""Ahead-of-time compile every kernel for Hopper (sm_90) at the 13B shapes, with no GPU and no driver.

Each job is one kernel at one launch configuration the autotuner (or the launch heuristic) may pick at the
13B serving shapes. Arguments are specialized exactly as ``triton.jit`` would specialize them at launch
(``native_specialize_impl``: pointer and integer divisibility by 16, integers equal to 1 become constants),
which matters: without the divisibility hints the loads are not vectorized and not software-pipelined, and
the cubin would not be the one the GPU runs. ``ptxas`` ships with triton, so the result is a real cubin.

    python -m framepack_rt.kernels.aot [--shard 0/2] [--json out.json]

Must run without ``TRITON_INTERPRET`` (under the interpreter ``triton.jit`` gives no compilable function).
It uses Triton's compiler entry points (``native_specialize_impl``, ``ASTSource(constexprs=, attrs=)``), which
older Triton releases lack: :func:`missing_compiler_support` says so instead of failing deep inside a compile
(the kernels themselves run on Triton 3.0 and later; this was written against 3.9).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

# 13B serving shapes: 640x640 -> 80x80 latents, window 9, F1 context (1x: 2 frames, 2x: 2, 4x: 16).
HEADS, HEAD_DIM, DIM = 24, 128, 3072
LATENT_HW = 80
VIDEO_TOKENS = 9 * 40 * 40 + 2 * 40 * 40 + 1 * 20 * 20 + 4 * 10 * 10  # noisy + 1x + 2x + 4x = 18,400
CONTEXT_TOKENS = 729 + 512  # SigLIP image tokens + at most 512 text tokens
SEQ = VIDEO_TOKENS + CONTEXT_TOKENS
TARGET = ("cuda", 90, 32)  # Hopper, warp size 32
SMEM_LIMIT = 232448  # sm_90 opt-in shared memory per block


@dataclass
class Job:
    kernel: str
    variant: str
    fn: Any  # triton.JITFunction
    args: dict[str, Any]  # runtime arguments by name (tensor stand-ins carry dtype and alignment)
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int = 3
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.kernel}[{self.variant}]"


def _t(dtype_name: str):
    import torch

    return torch.empty(8, dtype=getattr(torch, dtype_name))  # CPU allocations are 64-byte aligned


def jobs() -> list[Job]:
    """Every (kernel, configuration) to compile, in a fixed order."""
    from framepack_rt.kernels import adaln, packed_attention, patchify, qk_norm_rope

    out: list[Job] = []
    # Attention: bf16, the joint video + context sequence; every config the pruning keeps at this length.
    att = packed_attention
    bucket = 1 << (SEQ - 1).bit_length()
    for cfg in att.prune_configs(att.CONFIGS, HEAD_DIM, bucket, 2, SMEM_LIMIT):
        row = HEADS * HEAD_DIM
        args = dict(
            Q=_t("bfloat16"), K=_t("bfloat16"), V=_t("bfloat16"), Out=_t("bfloat16"), cu_seqlens=_t("int32"),
            qk_scale=HEAD_DIM**-0.5 * att.LOG2E,
            stride_qt=row, stride_qh=HEAD_DIM, stride_kt=row, stride_kh=HEAD_DIM, stride_vt=row, stride_vh=HEAD_DIM,
            stride_ot=row, stride_oh=HEAD_DIM, num_heads=HEADS, seqlen_bucket=bucket,
        )
        consts = dict(HEAD_DIM=HEAD_DIM, DOT_FP32=False, PRECISION="tf32", **cfg.kwargs)
        block_m, block_n = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
        variant = f"M{block_m}-N{block_n}-w{cfg.num_warps}-s{cfg.num_stages}"
        estimate = att.shared_bytes_estimate(block_m, block_n, cfg.num_stages, HEAD_DIM, 2)
        out.append(Job("packed_attention", variant, att._packed_attention_fwd, args, consts, cfg.num_warps,
                       cfg.num_stages, {"smem_estimate": estimate}))

    # Patchify: fp32 latents (the context buffers' default), bf16 weights; one kernel per patch size.
    scales = {  # kernel: (frames, tokens)
        (1, 2, 2): (9, 9 * 40 * 40),
        (2, 4, 4): (2, 1 * 20 * 20),
        (4, 8, 8): (16, 4 * 10 * 10),
    }
    for (kt, kh, kw), (frames, n_tokens) in scales.items():
        hw = LATENT_HW * LATENT_HW
        for cfg in patchify.prune_configs(patchify.CONFIGS, n_tokens, DIM):
            args = dict(
                X=_t("float32"), Wt=_t("bfloat16"), Bias=_t("bfloat16"), Out=_t("bfloat16"),
                stride_xb=16 * frames * hw, stride_xc=frames * hw, stride_xt=hw, stride_xh=LATENT_HW, stride_xw=1,
                stride_ob=VIDEO_TOKENS * DIM, stride_ol=DIM,
                frames=frames, height=LATENT_HW, width=LATENT_HW, grid_h=LATENT_HW // kh, grid_w=LATENT_HW // kw,
                n_tokens=n_tokens, c_out=DIM, k_total=16 * kt * kh * kw, token_offset=400,
            )
            consts = dict(KT=kt, KH=kh, KW=kw, HAS_BIAS=True, DOT_FP32=False, PRECISION="tf32", **cfg.kwargs)
            variant = (f"k{kt}{kh}{kw}-M{cfg.kwargs['BLOCK_M']}-N{cfg.kwargs['BLOCK_N']}-K{cfg.kwargs['BLOCK_K']}"
                       f"-w{cfg.num_warps}-s{cfg.num_stages}")
            out.append(Job("patchify", variant, patchify._patch_embed_kernel, args, consts, cfg.num_warps,
                           cfg.num_stages))

    # q/k RMSNorm + RoPE: video q/k (1, Lv, 24, 128) views of the projection, one shared fp32 table.
    cfg = qk_norm_rope.launch_config(HEAD_DIM)
    for has_rope in (True, False):
        args = dict(
            X=_t("bfloat16"), Out=_t("bfloat16"), Wt=_t("bfloat16"), Cos=_t("float32"), Sin=_t("float32"),
            n_rows=VIDEO_TOKENS * HEADS, seq_len=VIDEO_TOKENS, num_heads=HEADS,
            stride_xb=VIDEO_TOKENS * DIM, stride_xl=DIM, stride_xh=HEAD_DIM, stride_cb=0, stride_cl=HEAD_DIM,
            eps=qk_norm_rope.EPS,
        )
        consts = dict(HEAD_DIM=HEAD_DIM, HAS_ROPE=has_rope, BLOCK_R=cfg["BLOCK_R"])
        variant = f"{'rope' if has_rope else 'norm'}-R{cfg['BLOCK_R']}-w{cfg['num_warps']}"
        out.append(Job("qk_norm_rope", variant, qk_norm_rope._qk_norm_rope_kernel, args, consts, cfg["num_warps"]))

    # AdaLN: video stream (Lv, 3072) rows, per-sample vectors that are chunk() views of (1, 6 * 3072).
    cfg = adaln.launch_config(DIM)
    for has_residual in (True, False):
        args = dict(
            X=_t("bfloat16"), Y=_t("bfloat16"), Gate=_t("bfloat16"), Shift=_t("bfloat16"), Scale=_t("bfloat16"),
            XOut=_t("bfloat16"), ModOut=_t("bfloat16"), n_rows=VIDEO_TOKENS, dim=DIM, rows_per_vec=VIDEO_TOKENS,
            stride_x=DIM, stride_y=DIM, stride_gate=6 * DIM, stride_shift=6 * DIM, stride_scale=6 * DIM,
            eps=adaln.EPS,
        )
        consts = dict(HAS_RESIDUAL=has_residual, BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"])
        kind = "residual" if has_residual else "modulate"
        variant = f"{kind}-R{cfg['BLOCK_R']}-C{cfg['BLOCK_C']}-w{cfg['num_warps']}"
        out.append(Job("adaln", variant, adaln._adaln_kernel, args, consts, cfg["num_warps"]))
    return out


def missing_compiler_support() -> str | None:
    """None when this Triton has what the ahead-of-time compile uses, else what it lacks."""
    import inspect

    import triton

    try:
        from triton._C.libtriton import native_specialize_impl  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource, make_backend  # noqa: F401
    except ImportError as error:
        return f"triton {triton.__version__} lacks a compiler entry point ({error})"
    if "constexprs" not in inspect.signature(ASTSource).parameters:
        return f"triton {triton.__version__}: ASTSource takes no constexprs= (an older compiler interface)"
    return None


def specialize(job: Job, backend) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for ASTSource, as the JIT launcher would build them."""
    from triton._C.libtriton import native_specialize_impl

    signature, constexprs, attrs = {}, dict(job.constexprs), {}
    for index, name in enumerate(job.fn.arg_names):
        if name in job.constexprs:
            signature[name] = "constexpr"
            continue
        kind, spec = native_specialize_impl(type(backend), job.args[name], False, True, True)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[name] = spec
        elif isinstance(spec, str):
            attrs[(index,)] = backend.parse_attr(spec)
    missing = set(job.fn.arg_names) - set(signature)
    if missing:
        raise ValueError(f"{job.name}: no value for {sorted(missing)}")
    return signature, constexprs, attrs


def compile_job(job: Job) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    target = GPUTarget(*TARGET)
    signature, constexprs, attrs = specialize(job, make_backend(target))
    began = time.perf_counter()
    compiled = triton.compile(
        ASTSource(fn=job.fn, signature=signature, constexprs=constexprs, attrs=attrs),
        target=target,
        options={"num_warps": job.num_warps, "num_stages": job.num_stages},
    )
    return {
        "name": job.name,
        "kernel": job.kernel,
        "variant": job.variant,
        "cubin_bytes": len(compiled.asm.get("cubin", b"")),
        "shared_bytes": int(compiled.metadata.shared),
        "seconds": round(time.perf_counter() - began, 2),
        "uses_wgmma": "wgmma.mma_async" in compiled.asm.get("ptx", ""),
        "uses_async_copy": "cp.async" in compiled.asm.get("ptx", ""),
        **job.meta,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shard", default="0/1", help="i/n: compile every n-th job starting at i")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--list", action="store_true", help="print the job names only")
    opts = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("aot: TRITON_INTERPRET is set; unset it (the interpreter cannot compile)", file=sys.stderr)
        return 2
    missing = missing_compiler_support()
    if missing:
        print(f"aot: {missing}; ahead-of-time compiles need a newer Triton (written against 3.9)", file=sys.stderr)
        return 2
    index, count = (int(x) for x in opts.shard.split("/"))
    selected = jobs()[index::count]
    if opts.list:
        print("\n".join(job.name for job in selected))
        return 0
    results = []
    for job in selected:
        result = compile_job(job)
        results.append(result)
        print(f"{result['name']}: cubin {result['cubin_bytes']} B, shared {result['shared_bytes']} B, "
              f"{result['seconds']} s", flush=True)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
