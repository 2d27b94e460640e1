"""One full 13B transformer step at serving shapes, Triton kernels on vs off.

Random bf16 weights (the released architecture, 12.9B parameters, ~26 GB), 640x640 -> 80x80 latents,
window 9, F1 context (start + 1x, 2 x 2x, 16 x 4x latents), 729 image + ``--text-tokens`` text tokens,
fp32 output head. "off" is the model's torch path (attention: flash-attn when installed, else SDPA);
"on" routes attention, patchify, q/k norm + RoPE and AdaLN through the kernels (``use_kernels``).

FLOPs counted: the 60 blocks' linear layers (24 C^2 per token per block, both block kinds) and attention
(4 L^2 H D per block), about 261 + 272 TFLOP per step at these shapes; embedders, the text refiner and the
output head (< 0.5%) are left out. Utilization is against 989 TFLOP/s (H100 SXM dense bf16).

    python benchmarks/step_13b.py [--batch 1] [--text-tokens 100] [--iters 5] [--json]
"""

from __future__ import annotations

from framepack_rt.kernels.bench import parser, require_cuda


def step_flops(cfg, video_tokens: int, context_tokens: int) -> dict:
    tokens = video_tokens + context_tokens
    blocks = cfg.num_layers + cfg.num_single_layers
    linear = 2 * 12 * cfg.inner_dim**2 * tokens * blocks
    attention = 4 * tokens**2 * cfg.num_attention_heads * cfg.attention_head_dim * blocks
    return {"linear": linear, "attention": attention, "total": linear + attention}


def random_model(preset: str = "framepack-13b", device: str = "cuda"):
    """The structure built on the meta device, materialized in bf16 on ``device`` (no fp32 copy ever exists):
    matrices ~ N(0, 1/fan_in), norm weights 1, every other vector 0."""
    import torch

    from framepack_rt import FramePackTransformer
    from framepack_rt.kernels import bench

    model = FramePackTransformer.from_config(preset, dtype=torch.bfloat16, device="meta")
    model = model.to_empty(device=device).eval()
    bench.init_random_weights(model, torch.Generator(device=device).manual_seed(0))
    return model


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.set_defaults(warmup=2, iters=5)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--text-tokens", type=int, default=100)
    p.add_argument("--latent", type=int, default=80, help="latent height = width (640 px / 8)")
    args = p.parse_args()
    require_cuda("step_13b")

    import torch

    from framepack_rt.kernels import bench, use_kernels

    env = bench.environment()
    bench.print_environment(env)
    model = random_model()
    cfg, b, hw = model.config, args.batch, args.latent
    dev, bf16 = "cuda", torch.bfloat16
    inputs = dict(
        hidden_states=torch.randn(b, 16, 9, hw, hw, device=dev),
        timestep=torch.full((b,), 700.0, device=dev),
        encoder_hidden_states=torch.randn(b, args.text_tokens, cfg.text_embed_dim, device=dev, dtype=bf16),
        pooled_projections=torch.randn(b, cfg.pooled_projection_dim, device=dev, dtype=bf16),
        image_embeds=torch.randn(b, 729, cfg.image_proj_dim, device=dev, dtype=bf16),
        guidance=torch.full((b,), 10_000.0, device=dev),
        indices_latents=torch.arange(20, 29),
        latents_clean=torch.randn(b, 16, 2, hw, hw, device=dev),
        indices_latents_clean=torch.tensor([0, 19]),
        latents_history_2x=torch.randn(b, 16, 2, hw, hw, device=dev),
        indices_latents_history_2x=torch.tensor([17, 18]),
        latents_history_4x=torch.randn(b, 16, 16, hw, hw, device=dev),
        indices_latents_history_4x=torch.arange(1, 17),
    )
    grid = hw // 2
    video_tokens = 9 * grid**2 + 2 * grid**2 + (grid // 2) ** 2 + 4 * (grid // 4) ** 2
    flops = step_flops(cfg, video_tokens, 729 + args.text_tokens)
    flops = {k: v * b for k, v in flops.items()}
    print(f"{video_tokens} video + {729 + args.text_tokens} context tokens per sample, batch {b}: "
          f"{flops['linear'] / 1e12:.0f} TFLOP linear + {flops['attention'] / 1e12:.0f} TFLOP attention")

    rows, outputs = {}, {}
    with torch.inference_mode():
        for mode in ("off", "on"):
            with use_kernels(mode == "on"):
                outputs[mode] = model(**inputs).float()  # first call: autotuning, allocator warm-up
                t = bench.time_ms(lambda: model(**inputs), args.warmup, args.iters)
            achieved = bench.tflops(flops["total"], t["median_ms"])
            rows[mode] = {"kernels": mode, **t, "tflops": achieved,
                          "utilization": achieved / bench.H100_BF16_DENSE_TFLOPS}
            print(f"kernels {mode:>3}: {t['median_ms']:9.1f} ms/step  {achieved:6.1f} TFLOP/s  "
                  f"{100 * rows[mode]['utilization']:5.1f}% of 989")
    speedup = rows["off"]["median_ms"] / rows["on"]["median_ms"]
    diff = (outputs["on"] - outputs["off"]).abs().max().item()
    print(f"speedup {speedup:.2f}x; max |on - off| {diff:.3e} (random weights, bf16)")
    bench.write_json(__file__, args.json, {
        "benchmark": "step_13b", "environment": env, "batch": b, "video_tokens": video_tokens,
        "context_tokens": 729 + args.text_tokens, "flops": flops, "results": list(rows.values()),
        "speedup": speedup, "max_abs_diff_on_vs_off": diff,
    })


if __name__ == "__main__":
    main()
