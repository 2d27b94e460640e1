"""Sequence and CFG parallelism: the 13B's all-to-all traffic on paper, and measured step times of a small model.

    python benchmarks/parallel_scaling.py --paper                 # 13B, 640x640, F1 window 9, 8 GPUs
    python benchmarks/parallel_scaling.py --measure --processes 2 # demo transformer on gloo, this machine

--paper counts what framepack_rt/model/parallel.py moves: per block one all-to-all of q, k, v (3 tensors) and
one of the attention output (1 tensor), each tensor (tokens, hidden) in the compute dtype; a rank sends
(N-1)/N of its 1/N share of every tensor. FLOPs: per token and block 24 hidden^2 (the linears of either
stream, multiply-add = 2) and per sample and block 4 L^2 hidden for attention (QK^T and AV over the joint
sequence L). The time model assumes compute splits 1/N at the same efficiency and the all-to-alls do not
overlap compute; both are stated in the output.

--measure times the CFG pair step (batch 2, the engine's batched CFG) of the demo transformer (64x64 video)
in one process, then through DistributedTransformer on a gloo world of N processes on this machine:
sequence parallel over N, and CFG parallel (N/2 per branch). On a 2-core CPU this measures overhead, not
speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

WINDOW = 9
F1_CONTEXT = {"1x": 2, "2x": 2, "4x": 16}  # latents per scale: start + newest at 1x, 2 at 2x, 16 at 4x


def video_tokens(height_px: int, width_px: int) -> dict:
    """Joint-attention video tokens of one sample at a resolution (F1 layout, window 9), per part."""
    h, w = height_px // 8, width_px // 8  # latent
    ceil = lambda n, k: -(-n // k)  # noqa: E731  (replicate padding to the kernel)
    parts = {"noisy": WINDOW * (h // 2) * (w // 2), "clean 1x": F1_CONTEXT["1x"] * (h // 2) * (w // 2),
             "2x": ceil(F1_CONTEXT["2x"], 2) * ceil(h, 4) * ceil(w, 4),
             "4x": ceil(F1_CONTEXT["4x"], 4) * ceil(h, 8) * ceil(w, 8)}
    return parts


def paper(height: int, width: int, text_tokens: int, image_tokens: int, world: int, bandwidth_gbs: float,
          latency_us: float, tflops: float, dtype_bytes: int, batch: int) -> dict:
    from framepack_rt.model.config import FramePackConfig

    cfg = FramePackConfig.preset("framepack-13b")
    hidden, blocks = cfg.inner_dim, cfg.num_layers + cfg.num_single_layers
    parts = video_tokens(height, width)
    joint = sum(parts.values()) + text_tokens + image_tokens  # per sample
    tokens = joint * batch
    tensor_bytes = tokens * hidden * dtype_bytes
    total_bytes = tensor_bytes * 4 * blocks  # q, k, v and output, every block
    per_rank_sent = total_bytes / world * (world - 1) / world
    flops = batch * blocks * (24 * hidden**2 * joint + 4 * joint**2 * hidden)
    one_gpu_s = flops / (tflops * 1e12)
    compute_s = one_gpu_s / world
    comm_s = per_rank_sent / (bandwidth_gbs * 1e9) + 2 * blocks * latency_us * 1e-6
    return {
        "resolution": f"{width}x{height}", "batch": batch, "video_tokens": parts, "joint_tokens_per_sample": joint,
        "hidden": hidden, "blocks": blocks, "world": world,
        "all_to_all_bytes_per_step_total_GB": total_bytes / 1e9,
        "all_to_all_bytes_per_step_sent_per_rank_GB": per_rank_sent / 1e9,
        "step_TFLOP": flops / 1e12,
        "assumed": {"sustained_TFLOPs_per_gpu": tflops, "all_to_all_GBs_per_gpu": bandwidth_gbs,
                    "latency_us_per_collective": latency_us, "overlap": "none", "compute_split": "1/N, same efficiency"},
        "one_gpu_step_s": one_gpu_s, "n_gpu_compute_s": compute_s, "n_gpu_comm_s": comm_s,
        "n_gpu_step_s": compute_s + comm_s, "speedup": one_gpu_s / (compute_s + comm_s),
    }


# -- measured ----------------------------------------------------------------------------------------------------
def demo_inputs(model) -> tuple[tuple, dict, tuple]:
    """A CFG pair call of the demo model at 64x64 (8x8 latents): (latent shape, prepare kwargs, step args)."""
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    randn = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    b, h, w = 2, 8, 8
    mask = torch.ones(b, 16, dtype=torch.long)
    mask[1, 5:] = 0  # the two branches' prompts differ in length, as the engine's pair does
    prepare = dict(encoder_hidden_states=randn(b, 16, cfg.text_embed_dim), encoder_attention_mask=mask,
                   pooled_projections=randn(b, cfg.pooled_projection_dim), image_embeds=randn(b, 7, cfg.image_proj_dim),
                   indices_latents=torch.arange(20, 29), latents_clean=randn(b, 16, 2, h, w),
                   indices_latents_clean=torch.tensor([0, 19]), latents_history_2x=randn(b, 16, 2, h, w),
                   indices_latents_history_2x=torch.tensor([17, 18]), latents_history_4x=randn(b, 16, 16, h, w),
                   indices_latents_history_4x=torch.arange(1, 17))
    step = (randn(b, 16, WINDOW, h, w), torch.full((b,), 700.0), torch.full((b,), 10_000.0))
    return (b, WINDOW, h, w), prepare, step


def load_demo():
    from framepack_rt.model.transformer import FramePackTransformer
    from framepack_rt.pipeline import builtin

    return FramePackTransformer.from_pretrained(builtin.demo_weights_dir() / "transformer", dtype=torch.float32).eval()


def time_steps(model, plan, step: tuple, steps: int) -> float:
    with torch.no_grad():
        for _ in range(3):
            model.step(plan, *step)
        began = time.perf_counter()
        for _ in range(steps):
            model.step(plan, *step)
    return (time.perf_counter() - began) / steps * 1000


def measured_job(world, steps: int) -> dict | None:
    from framepack_rt.engine.parallel import DistributedTransformer, ParallelWorld, follow

    results = {}
    for name, w in (("sequence parallel", world), ("cfg parallel", ParallelWorld.build(world.device, True))):
        model = load_demo()
        if w.rank != 0:
            follow(model, w)
            continue
        shape, prepare, step = demo_inputs(model)
        with DistributedTransformer(model, w) as proxy:
            with torch.no_grad():
                plan = proxy.prepare(shape, **prepare)
            results[name] = time_steps(proxy, plan, step, steps)
    return results if world.rank == 0 else None


def measure(world: int, steps: int) -> dict:
    from framepack_rt.pipeline.parallel_launch import LaunchConfig, launch

    model = load_demo()
    shape, prepare, step = demo_inputs(model)
    with torch.no_grad():
        plan = model.prepare(shape, **prepare)
    single = {threads: None for threads in (torch.get_num_threads(), max(1, torch.get_num_threads() // world))}
    for threads in single:
        torch.set_num_threads(threads)
        single[threads] = time_steps(model, plan, step, steps)
    parallel = launch(measured_job, LaunchConfig(world, timeout_s=120), steps)
    return {"model": "demo transformer, CFG pair (batch 2), 64x64, window 9", "steps_timed": steps,
            "cpu": os.cpu_count(), "load_average": os.getloadavg(),
            "one_process_ms_per_step_by_threads": single,
            f"{world}_processes_ms_per_step": parallel, "backend": "gloo, one machine, threads split between ranks"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--paper", action="store_true")
    ap.add_argument("--measure", action="store_true")
    ap.add_argument("--world", type=int, default=8, help="GPUs on paper")
    ap.add_argument("--processes", type=int, default=2, help="gloo processes measured on this machine")
    ap.add_argument("--height", type=int, default=640)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--text-tokens", type=int, default=256, help="real prompt tokens (HunyuanVideo's limit 256)")
    ap.add_argument("--image-tokens", type=int, default=729, help="SigLIP tokens")
    ap.add_argument("--batch", type=int, default=1, help="samples per step: 2 for real CFG batched")
    ap.add_argument("--bandwidth", type=float, default=300.0, help="all-to-all GB/s per GPU (H100 NVLink: ~300)")
    ap.add_argument("--latency-us", type=float, default=30.0, help="fixed cost per all-to-all")
    ap.add_argument("--tflops", type=float, default=540.0, help="sustained bf16 TFLOP/s of one GPU")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json")
    args = ap.parse_args()
    out = {}
    if args.paper or not args.measure:
        out["paper"] = paper(args.height, args.width, args.text_tokens, args.image_tokens, args.world, args.bandwidth,
                             args.latency_us, args.tflops, 2, args.batch)
    if args.measure:
        out["measured"] = measure(args.processes, args.steps)
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
