"""The 13B under a memory budget: peak device memory, pinned host bytes and step time, bf16 and fp8.

Random weights (the released architecture, 12.9B parameters), 640x640 -> 80x80 latents, window 9, F1 context,
729 image + ``--text-tokens`` text tokens, batch 1, fp32 output head. For each weight format (bf16, fp8) the
model is first timed all-resident, then under each ``--budgets`` GiB with low-VRAM streaming: the memory plan
(framepack_rt/model/memory_plan.py) gives BlockStreamer its weight budget (the budget less activations,
section tensors, TeaCache buffers, VAE and workspace), and the run reports

* ``torch.cuda.max_memory_allocated`` over the steps (must stay under the budget; the VAE and TeaCache are not
  loaded here, so it should also stay under the plan's transformer phase);
* pinned host bytes: the streamer's arena (page-locked with cudaHostRegister) and torch's pinned-memory
  allocator (which the streamer does not use: it should stay at 0);
* the median step time against all-resident, the bytes copied per step and the copies the compute waited for.

    python benchmarks/memory_13b.py [--budgets 6 8] [--formats bf16 fp8] [--steps 4] [--json]

Host RAM: the CPU copy of the model plus the arena (about 45 GiB for bf16 at 6 GiB).
"""

from __future__ import annotations

import time

from framepack_rt.kernels.bench import parser, require_cuda

GiB = 2**30


def random_model(quantize: str | None, preset: str = "framepack-13b"):
    """The 13B on the CPU in bf16 (fp8 linears in the blocks when ``quantize``): matrices ~ N(0, 1/fan_in),
    norm weights 1, other vectors 0. fp8 layers get their weights drawn directly in the fp8 range."""
    import torch

    from framepack_rt import FramePackTransformer
    from framepack_rt.kernels import bench
    from framepack_rt.model.quantize import quantize_blocks

    model = FramePackTransformer.from_config(preset, dtype=torch.bfloat16, device="meta")
    if quantize:
        quantize_blocks(model, quantize)  # on the meta device: the layer types and shapes, no data
    model = model.to_empty(device="cpu").eval()
    bench.init_random_weights(model, torch.Generator().manual_seed(0))
    return model


def step_inputs(model, latent: int, text_tokens: int, device: str) -> tuple[tuple, dict, tuple]:
    import torch

    cfg, bf16, hw = model.config, torch.bfloat16, latent
    prepare = dict(
        encoder_hidden_states=torch.randn(1, text_tokens, cfg.text_embed_dim, device=device, dtype=bf16),
        pooled_projections=torch.randn(1, cfg.pooled_projection_dim, device=device, dtype=bf16),
        image_embeds=torch.randn(1, 729, cfg.image_proj_dim, device=device, dtype=bf16),
        indices_latents=torch.arange(20, 29),
        latents_clean=torch.randn(1, 16, 2, hw, hw, device=device),
        indices_latents_clean=torch.tensor([0, 19]),
        latents_history_2x=torch.randn(1, 16, 2, hw, hw, device=device),
        indices_latents_history_2x=torch.tensor([17, 18]),
        latents_history_4x=torch.randn(1, 16, 16, hw, hw, device=device),
        indices_latents_history_4x=torch.arange(1, 17),
    )
    step = (torch.randn(1, 16, 9, hw, hw, device=device), torch.full((1,), 700.0, device=device),
            torch.full((1,), 10_000.0, device=device))
    return (1, 9, hw, hw), prepare, step


def run_steps(model, latent: int, text_tokens: int, steps: int) -> dict:
    """Prepare once, then ``steps`` steps (the first untimed); peak allocated over the steps only."""
    import torch

    shape, prepare, (x, t, g) = step_inputs(model, latent, text_tokens, "cuda")
    with torch.inference_mode():
        plan = model.prepare(shape, **prepare)
        model.step(plan, x, t, g)  # warm-up: attention selection, allocator, first copies
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(steps):
            began = time.perf_counter()
            model.step(plan, x, t, g)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - began)
    times.sort()
    return {"step_s_median": times[len(times) // 2], "step_s_min": times[0],
            "max_allocated": torch.cuda.max_memory_allocated()}


def host_pinned_by_torch() -> int | None:
    import torch

    stats = getattr(torch.cuda, "host_memory_stats", None)
    if stats is None:
        return None
    return int(stats().get("allocated_bytes.current", stats().get("reserved_bytes.current", 0)))


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--budgets", type=float, nargs="+", default=[6, 8], help="GiB")
    p.add_argument("--formats", nargs="+", default=["bf16", "fp8"], choices=["bf16", "fp8"])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--latent", type=int, default=80, help="latent height = width (640 px / 8)")
    p.add_argument("--text-tokens", type=int, default=100)
    p.add_argument("--prefetch", type=int, default=1)
    args = p.parse_args()
    require_cuda("memory_13b")

    import torch

    from framepack_rt.kernels import bench
    from framepack_rt.model.memory_plan import plan_memory
    from framepack_rt.model.offload import BlockStreamer

    env = bench.environment()
    bench.print_environment(env)
    results = []
    for fmt in args.formats:
        quantize = "fp8" if fmt == "fp8" else None
        began = time.perf_counter()
        model = random_model(quantize)
        print(f"{fmt}: random 13B built on the CPU in {time.perf_counter() - began:.0f} s")
        model.to("cuda")
        resident = run_steps(model, args.latent, args.text_tokens, args.steps)
        model.to("cpu")
        torch.cuda.empty_cache()
        print(f"{fmt} all-resident: {resident['step_s_median']:.3f} s/step, "
              f"max allocated {resident['max_allocated'] / GiB:.2f} GiB")
        results.append({"format": fmt, "budget_gib": None, **resident})
        for budget in args.budgets:
            plan = plan_memory(model.config, height=8 * args.latent, width=8 * args.latent, window=9,
                               quantize=quantize, budget_bytes=int(budget * GiB), prefetch=args.prefetch,
                               text_tokens=args.text_tokens)
            torch.cuda.reset_peak_memory_stats()
            streamer = BlockStreamer(model, "cuda", plan.streamer_weight_budget, prefetch=args.prefetch)
            streamer.stats.reset_traffic()
            run = run_steps(model, args.latent, args.text_tokens, args.steps)
            s = streamer.stats
            transformer_phase = plan.weights.device_bytes + plan.step_bytes - plan.teacache_bytes + plan.workspace
            row = {
                "format": fmt, "budget_gib": budget, **run,
                "under_budget": run["max_allocated"] <= budget * GiB,
                "planned_transformer_phase": transformer_phase, "planned_peak_with_vae": plan.peak_bytes,
                "resident_blocks": len(streamer.plan.resident), "streamed_blocks": len(streamer.streamed),
                "pinned_arena_bytes": s.arena_bytes, "streamed_weight_bytes": plan.weights.streamed_bytes,
                "torch_pinned_bytes": host_pinned_by_torch(),
                "copied_per_step": s.streamed_bytes / (args.steps + 1), "stalls": s.stalls,
                "slowdown_vs_resident": run["step_s_median"] / resident["step_s_median"],
            }
            results.append(row)
            print(f"{fmt} at {budget:g} GiB: {row['resident_blocks']} resident / {row['streamed_blocks']} streamed, "
                  f"max allocated {run['max_allocated'] / GiB:.2f} GiB "
                  f"({'under' if row['under_budget'] else 'OVER'} budget; planned {transformer_phase / GiB:.2f}), "
                  f"pinned {s.arena_bytes / GiB:.2f} GiB (torch's pinned pool {row['torch_pinned_bytes']}), "
                  f"{run['step_s_median']:.3f} s/step = {row['slowdown_vs_resident']:.2f}x all-resident, "
                  f"{row['copied_per_step'] / GiB:.2f} GiB copied a step, {s.stalls} stalls")
            streamer.detach()
            model.to("cpu")
            del streamer
            torch.cuda.empty_cache()
        del model
    bench.write_json(__file__, args.json, {"benchmark": "memory_13b", "environment": env, "results": results})


if __name__ == "__main__":
    main()
