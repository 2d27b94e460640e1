"""What the GPU benchmarks (benchmarks/bench_*.py, benchmarks/step_13b.py) share: the CUDA check, timing with
CUDA events, the environment line and the JSON report. Nothing here runs at import."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch

H100_BF16_DENSE_TFLOPS = 989.0  # H100 SXM dense bf16 peak


def require_cuda(script: str) -> None:
    """Exit with one line (no traceback) when there is no CUDA device."""
    if not torch.cuda.is_available():
        sys.exit(f"{script}: no CUDA device available (torch {torch.__version__}); this benchmark needs a GPU")


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--warmup", type=int, default=10, help="untimed calls first (autotuning happens here)")
    p.add_argument("--iters", type=int, default=50, help="timed calls")
    p.add_argument("--json", nargs="?", const="", default=None, metavar="PATH",
                   help="write results as JSON (default path: benchmarks/results/<script>.json)")
    return p


def environment() -> dict:
    import triton

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {
        "gpu": props.name,
        "sm": f"{props.major}.{props.minor}",
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }


def print_environment(env: dict) -> None:
    print(f"GPU {env['gpu']} (sm_{env['sm'].replace('.', '')}, {env['gpu_memory_gib']} GiB) | "
          f"torch {env['torch']} | triton {env['triton']} | CUDA {env['cuda']}")


def time_ms(fn: Callable[[], object], warmup: int, iters: int) -> dict:
    """Per-call milliseconds of ``fn`` from CUDA events, after ``warmup`` untimed calls: median, min, mean."""
    from framepack_rt.model.attention import cuda_event_times

    times = cuda_event_times(fn, warmup, iters)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "mean_ms": statistics.fmean(times)}


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def fused_vs_eager(case: str, fused: Callable[[], object], eager: Callable[[], object], nbytes: float,
                   error: float, warmup: int, iters: int) -> list[dict]:
    """Time a memory-bound kernel against its eager torch reference; print and return one row for each."""
    rows = []
    for name, fn in (("triton_fused", fused), ("torch_eager", eager)):
        t = time_ms(fn, warmup, iters)
        row = {"case": case, "impl": name, **t, "gbps": gbps(nbytes, t["median_ms"])}
        if name == "triton_fused":
            row["max_abs_error_vs_eager"] = error
        rows.append(row)
        print(f"[{case}] {name:>13}: {t['median_ms']:8.3f} ms  {row['gbps']:7.1f} GB/s"
              + (f"  (max |err| vs eager {error:.2e})" if name == "triton_fused" else ""))
    print(f"[{case}] speedup {rows[-1]['median_ms'] / rows[-2]['median_ms']:.2f}x")
    return rows


def write_json(script_file: str, path: str | None, payload: dict) -> None:
    """``--json`` given: write ``payload`` to PATH, or to results/<script>.json next to the script."""
    if path is None:
        return
    script = Path(script_file).resolve()
    target = Path(path) if path else script.parent / "results" / f"{script.stem}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(payload, indent=1))
    print(f"wrote {target}")


def init_random_weights(model: torch.nn.Module, generator: torch.Generator) -> torch.nn.Module:
    """Random weights for benchmarks, in place on the model's (already materialized) device: matrices
    ~ N(0, 1/fan_in), norm weights 1, other vectors 0; fp8 linears (model/quantize.py) drawn directly in the
    fp8 range with the matching scale. One draw order, so every benchmark gets the same weights for a seed."""
    from framepack_rt.model.layers import RMSNorm
    from framepack_rt.model.quantize import FP8_MAX, Fp8Linear

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Fp8Linear):
                draw = torch.randn(module.weight.shape, generator=generator, device=generator.device)
                module.weight.copy_((draw * FP8_MAX / 4).to(module.weight.dtype))
                module.weight_scale.fill_(4 / FP8_MAX * module.in_features**-0.5)
        for param in model.parameters():  # fp8 weights are buffers: untouched here
            if param.ndim >= 2:
                param.normal_(0.0, param[0].numel() ** -0.5, generator=generator)
            else:
                param.zero_()
        for module in model.modules():
            if isinstance(module, (RMSNorm, torch.nn.LayerNorm)) and module.weight is not None:
                module.weight.fill_(1.0)
    return model
