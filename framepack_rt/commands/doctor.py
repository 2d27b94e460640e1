"""``framepack-rt doctor``: what this machine will do with a model, the first thing to run on a new GPU.

    framepack-rt doctor                                  # the demo model, the default device
    framepack-rt doctor --model /models/framepack --device cuda:1 --json

Sections: versions (torch, triton, CUDA, driver, flash-attn, sageattention), the device (name, memory), the
kernels' self-checks, the attention backend chosen at the model's shapes with its throughput, one timed
transformer step with the projected seconds per frame, and the memory estimate. What cannot run here is
skipped with the reason; a section that fails reports its error and the others still run. Exit code 0, or
1 when a section failed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from typing import Any, Callable

import torch

from framepack_rt.commands import transformer_step as steps
from framepack_rt.pipeline import builtin, devices, memory
from framepack_rt.pipeline.devices import Placement, dtype_name

CPU_KERNELS_SKIPPED = "no CUDA device (the kernels run on CUDA; tests run them under Triton's interpreter)"
CPU_STEP_MAX_PARAMS = 1_000_000_000  # larger transformers take minutes a step on a CPU: not timed there
STEP_REPEATS = 3  # timed steps after the warm-up (their mean is reported)
CPU_ATTENTION_MAX_FLOP = 2e10  # attention problems timed on a CPU: up to about a second
PACKAGES = {"triton": "triton", "flash-attn": "flash_attn", "flash-attn-3": "flash_attn_3",
            "sageattention": "sageattention", "transformers": "transformers", "diffusers": "diffusers",
            "framepack-rt": "framepack-rt"}

Section = dict[str, Any]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from framepack_rt.commands import model_flag

    model_flag.add_argument(parser, presets=True)  # a PATH here may also be a transformer folder alone
    devices.add_arguments(parser, memory=True)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the report")


# -- sections ------------------------------------------------------------------------------------------------
def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _driver_version() -> str | None:
    """The NVIDIA driver's version from nvidia-smi (None without one)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def versions() -> Section:
    found = {name: _version(dist) for name, dist in PACKAGES.items()}
    return {"status": "ok", "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
            "driver": _driver_version(), **found}


def _meminfo(key: str) -> int | None:
    try:
        for line in open("/proc/meminfo", encoding="ascii"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8", errors="replace"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(placement: Placement) -> Section:
    device = placement.device
    info: Section = {"status": "ok", "device": str(device), "compute_dtype": dtype_name(placement.compute_dtype),
                     "auto_dtype": placement.dtype is None,
                     # Other work on the host slows the step below (on the CPU a lot: torch's threads contend).
                     "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        free, total = torch.cuda.mem_get_info(device)
        info.update(name=props.name, capability=f"sm_{props.major}{props.minor}", total_bytes=total, free_bytes=free,
                    multiprocessors=props.multi_processor_count, bf16=devices.supports_bf16(device))
    elif device.type == "mps":
        info.update(name="Apple GPU (MPS)", total_bytes=torch.mps.recommended_max_memory(),
                    free_bytes=memory.device_free_bytes(device))
    else:
        info.update(name=_cpu_name(), cores=os.cpu_count(), torch_threads=torch.get_num_threads(),
                    total_bytes=_meminfo("MemTotal"), free_bytes=memory.host_available_bytes())
    return info


def kernel_shapes(config) -> dict[str, tuple[int, ...]]:
    """Each kernel's shape class at this model: what selects its compiled variant."""
    return {"patchify": (config.in_channels, config.inner_dim), "qk_norm_rope": (config.attention_head_dim,),
            "modulate": (config.inner_dim,), "residual_gate_modulate": (config.inner_dim,),
            "packed_attention": (config.attention_head_dim,)}


def kernels(placement: Placement, config) -> Section:
    if placement.device.type != "cuda":
        return {"status": "skipped", "reason": CPU_KERNELS_SKIPPED}
    from framepack_rt.kernels.selfcheck import check_all

    results = check_all(placement.device, placement.compute_dtype, kernel_shapes(config))
    rows = [{"name": r.name, "ok": r.ok, "reason": r.reason, "max_error": r.max_error, "tolerance": r.tolerance,
             "shape": list(r.shape)} for r in results]
    failed = [r["name"] for r in rows if not r["ok"]]
    # A failing kernel is not a failure of the machine: its op runs on torch from then on (said in the reason).
    return {"status": "ok", "results": rows, "failed": failed}


def _attention_problem(length: int, heads: int, head_dim: int, device: torch.device, dtype: torch.dtype) -> tuple:
    """q, k, v (length, heads, head_dim) of one sequence, and its cu_seqlens: the packed layout."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(length, heads, head_dim, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    return q, k, v, torch.tensor([0, length], dtype=torch.int32, device=device)


def attention(placement: Placement, config, shapes: steps.StepShapes) -> Section:
    from framepack_rt.model.attention import attention_for

    device, dtype = placement.device, placement.compute_dtype
    length, heads, head_dim = shapes.tokens(config), config.num_attention_heads, config.attention_head_dim
    choice = attention_for(device, dtype, head_dim, length)
    section: Section = {"status": "ok", "backend": choice.name, "reason": choice.reason, "tokens": length,
                        "heads": heads, "head_dim": head_dim, "dtype": dtype_name(dtype)}
    summary = getattr(choice, "summary", None)
    if callable(summary):
        section["summary"] = summary()
    if choice.tflops is not None:
        section.update(tflops=choice.tflops, timed_by="the backend selection")
        return section
    flop = 4.0 * length * length * head_dim * heads
    if device.type == "cpu" and flop > CPU_ATTENTION_MAX_FLOP:
        section["timing"] = (f"skipped: {flop / 1e12:.1f} TFLOP a call would take minutes on the CPU; run doctor "
                             "on the GPU")
        return section
    q, k, v, cu_seqlens = _attention_problem(length, heads, head_dim, device, dtype)
    scale = head_dim**-0.5
    with torch.no_grad():
        choice.fn(q, k, v, cu_seqlens, length, [length], scale)  # warm-up
        steps.synchronize(device)
        began = time.perf_counter()
        choice.fn(q, k, v, cu_seqlens, length, [length], scale)
        steps.synchronize(device)
    seconds = time.perf_counter() - began
    section.update(ms=seconds * 1000, tflops=flop / seconds / 1e12, timed_by="doctor, one call after a warm-up")
    return section


def _transformer_params(config) -> int:
    from framepack_rt.model.transformer import FramePackTransformer

    meta = FramePackTransformer.from_config(config, device="meta")
    return sum(p.numel() for p in meta.parameters())


def step(spec: str, placement: Placement, config, shapes: steps.StepShapes, quantize: str | None = None,
         compile: bool = False) -> Section:
    params = _transformer_params(config)
    base: Section = {"shapes": shapes.describe(config), "tokens": shapes.tokens(config), "parameters": params,
                     "steps": shapes.steps, "frames_per_section": shapes.frames_per_section,
                     "quantize": quantize, "compile": compile}
    if placement.device.type == "cpu":
        if spec == "framepack-13b":
            need = params * placement.compute_dtype.itemsize
            return {**base, "status": "skipped", "reason": (
                f"framepack-13b has no weights: random ones would need {memory.human_bytes(need)} of RAM in "
                f"{dtype_name(placement.compute_dtype)} and a step takes minutes on a CPU; run doctor on a GPU, or "
                "pass --model PATH")}
        if params > CPU_STEP_MAX_PARAMS:
            return {**base, "status": "skipped", "reason": (
                f"a step of a {params / 1e9:.1f} B-parameter transformer takes minutes on a CPU; run doctor on a GPU")}
    else:
        weights = params * placement.compute_dtype.itemsize
        need = weights + memory.margin_bytes(weights)
        free = memory.device_free_bytes(placement.device)
        if free is not None and need > free:
            return {**base, "status": "skipped", "reason": (
                f"the transformer alone needs {memory.human_bytes(need)} on {placement.device} and "
                f"{memory.human_bytes(free)} is free; the pipeline would run it in low-VRAM mode (see memory)")}
    model = steps.load_transformer(spec, placement, quantize=quantize, compile=compile)
    inputs = steps.example_inputs(config, shapes, placement.device, placement.compute_dtype)
    ms, out = steps.time_forward(model, inputs, repeats=STEP_REPEATS)
    finite = bool(torch.isfinite(out.float()).all())
    seconds_per_frame = ms / 1000 * shapes.steps / shapes.frames_per_section
    del model
    return {**base, "status": "ok", "ms": ms, "seconds_per_frame": seconds_per_frame,
            "frames_per_second": 1 / seconds_per_frame, "output_finite": finite,
            "note": "batch 1: steps with real CFG run both branches as a batch of 2"}


def _tiny_sizes() -> dict[str, tuple[int, int, str]]:
    from framepack_rt.pipeline.tiny_models import build_tiny_models

    tiny = build_tiny_models(0)
    return {name: memory.count_module(getattr(tiny, name), "built in code")
            for name in memory.WEIGHT_PARTS}


def memory_estimate(spec: str, placement: Placement, low_vram: bool, budget_gb: float | None,
                    quantize: str | None = None) -> Section:
    """What the model needs on the device, planned at the release's largest bucket (640x640, window 9) for
    folders and the 13B preset; the tiny model with the flat margin."""
    from framepack_rt.model.transformer import FramePackTransformer
    from framepack_rt.pipeline.model_folders import MissingModelPart, resolve_model_paths

    budget = int((budget_gb or memory.DEFAULT_BUDGET_GB) * memory.GiB) if low_vram else None
    notes = []
    if spec == "tiny":
        estimate = memory.estimate_parts(_tiny_sizes(), placement, low_vram=low_vram, budget_bytes=budget)
    elif spec == "framepack-13b":
        meta = FramePackTransformer.from_config(spec, device="meta")
        sizes = {"transformer": memory.count_module(meta, "meta-device model of the preset")}
        notes.append("the transformer only: encoders and VAE are counted from a model folder (--model PATH)")
        estimate = memory.estimate_parts(sizes, placement, low_vram=low_vram, budget_bytes=budget,
                                         min_budget_bytes=memory.min_budget_for(meta, placement.compute_dtype),
                                         plan_inputs=memory.PlanInputs(meta.config, quantize=quantize,
                                                                       vae_channels=None))
    else:
        root = builtin.demo_weights_dir() if spec == "demo" else spec
        try:
            folders = asdict(resolve_model_paths(root))
        except MissingModelPart:
            folders = {"transformer": steps.transformer_folder(spec)}
            notes.append("only the transformer was found there: the encoders and VAE are not counted")
        estimate = memory.estimate_folders(folders, placement, low_vram=low_vram, budget_bytes=budget,
                                           quantize=quantize)
    estimate = memory.with_free_memory(estimate)
    section: Section = {"status": "ok", "summary": estimate.summary(), **estimate.to_json()}
    section["notes"] = [*section["notes"], *notes]
    if estimate.fits() is False:
        section["advice"] = memory.advice(estimate)
    return section


# -- running and printing ------------------------------------------------------------------------------------
def _run_section(fn: Callable[[], Section]) -> Section:
    """The section's result; an error inside it becomes a failed section, so the others still run."""
    began = time.perf_counter()
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 -- a diagnostic reports every failure instead of stopping at one
        result = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
    result["seconds"] = round(time.perf_counter() - began, 3)
    return result


def diagnose(spec: str, placement: Placement, *, low_vram: bool = False, memory_budget_gb: float | None = None,
             quantize: str | None = None, compile: bool = False) -> dict[str, Any]:
    """Every section for model ``spec`` on ``placement``; one JSON-ready dict."""
    if spec == "tiny":
        placement = devices.fp32_only(placement)
    config = steps.model_config(spec)
    shapes = steps.shapes_for(spec)
    report: dict[str, Any] = {"model": spec, "placement": placement.describe()}
    report["versions"] = _run_section(versions)
    report["device"] = _run_section(lambda: device_info(placement))
    report["kernels"] = _run_section(lambda: kernels(placement, config))
    report["attention"] = _run_section(lambda: attention(placement, config, shapes))
    report["step"] = _run_section(lambda: step(spec, placement, config, shapes, quantize, compile))
    report["memory"] = _run_section(lambda: memory_estimate(spec, placement, low_vram, memory_budget_gb, quantize))
    return report


def _bytes(nbytes: int | None) -> str:
    return "unknown" if nbytes is None else memory.human_bytes(nbytes)


def _line(name: str, section: Section, text: Callable[[Section], str]) -> str:
    if section["status"] != "ok":
        return f"{name:<10} {section['status']}: {section['reason']}"
    return f"{name:<10} {text(section)}"


def format_report(report: dict[str, Any]) -> str:
    """The report as lines for a terminal."""
    def versions_text(v: Section) -> str:
        names = ["python", "torch", "cuda", "driver", "triton", "flash-attn", "flash-attn-3", "sageattention"]
        return ", ".join(f"{n} {v.get(n) or 'none'}" for n in names)

    def device_text(d: Section) -> str:
        extra = (f"{d['capability']}, bf16 {'yes' if d['bf16'] else 'no'}, " if "capability" in d else
                 f"{d.get('cores')} cores, {d.get('torch_threads')} torch threads, " if "cores" in d else "")
        load = f", load average {d['load_avg_1m']:g}" if d.get("load_avg_1m") is not None else ""
        return (f"{d['device']}: {d['name']}, {extra}{_bytes(d['total_bytes'])} total, {_bytes(d['free_bytes'])} "
                f"free{load}")

    def kernels_text(k: Section) -> str:
        rows = [f"{r['name']} {'ok' if r['ok'] else 'FAILED: ' + r['reason']}" for r in k["results"]]
        return "; ".join(rows)

    def attention_text(a: Section) -> str:
        head = f"{a['backend']} ({a['reason']}) at {a['tokens']} tokens x {a['heads']} heads x {a['head_dim']}"
        if "tflops" in a:
            return f"{head}: {a['tflops']:.3g} TFLOP/s ({a['timed_by']})"
        return f"{head}; timing {a.get('timing', 'not measured')}"

    def step_text(s: Section) -> str:
        return (f"{s['ms']:.1f} ms a step ({s['shapes']}); {s['steps']} steps per {s['frames_per_section']}-frame "
                f"section: {s['seconds_per_frame']:.4g} s a frame ({s['frames_per_second']:.1f} frames/s; {s['note']})")

    def memory_text(m: Section) -> str:
        verdict = {True: "fits", False: "does not fit", None: "free memory unknown"}[m["fits"]]
        text = f"{m['summary']}: {verdict}"
        if m.get("advice"):
            text += f" ({m['advice']})"
        return text + "".join(f"; {n}" for n in m["notes"])

    lines = [f"framepack-rt doctor: model {report['model']} on {report['placement']}",
             _line("versions", report["versions"], versions_text),
             _line("device", report["device"], device_text),
             _line("kernels", report["kernels"], kernels_text),
             _line("attention", report["attention"], attention_text),
             _line("step", report["step"], step_text),
             _line("memory", report["memory"], memory_text)]
    if report["step"]["status"] == "skipped" and "shapes" in report["step"]:
        lines[5] += f" ({report['step']['shapes']})"
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    """Strict JSON: non-finite floats (a kernel's NaN error) as strings, other objects by their str."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def run(args: argparse.Namespace) -> int:
    devices.check_memory_flags(args.low_vram, args.memory_budget_gb)
    placement = devices.resolve_placement(args.device, args.dtype)
    report = diagnose(args.model, placement, low_vram=args.low_vram, memory_budget_gb=args.memory_budget_gb,
                      quantize=args.quantize, compile=args.compile)
    if args.json:
        json.dump(_jsonable(report), sys.stdout, allow_nan=False)
        sys.stdout.write("\n")
    else:
        print(format_report(report))
    failed = [name for name, section in report.items() if isinstance(section, dict) and section["status"] == "failed"]
    return 1 if failed else 0
