"""Multi-scale patchify at the 13B shapes: the fused Triton kernel against the model's eager torch path.

640x640 -> 80x80 latents, window 9, F1 context: noisy 9 frames (1,2,2), clean 1x 2 frames (1,2,2), 2x 2 frames
(2,4,4), 4x 16 frames (4,8,8); 16 -> 3072 channels, bf16 weights, fp32 latents (the context buffers' default).
Eager torch = replicate pad + permute + copy + GEMM per scale, then torch.cat. Reports ms, the GEMM TFLOP/s
and the effective bandwidth (latents + weights read once, tokens written once).

    python benchmarks/bench_patchify.py [--latent-dtype float32|bfloat16] [--json]
"""

from __future__ import annotations

from framepack_rt.kernels.bench import parser, require_cuda

# (kernel, frames) in packed order [4x | 2x | 1x | noisy]
SCALES = [((4, 8, 8), 16), ((2, 4, 4), 2), ((1, 2, 2), 2), ((1, 2, 2), 9)]


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--latent-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--height", type=int, default=80)
    p.add_argument("--width", type=int, default=80)
    args = p.parse_args()
    require_cuda("bench_patchify")

    import torch

    from framepack_rt.kernels import bench
    from framepack_rt.kernels.patchify import fused_patchify, fused_patchify_reference, token_count

    env = bench.environment()
    bench.print_environment(env)
    latent_dtype = getattr(torch, args.latent_dtype)
    dim, c_in = 3072, 16
    scales = []
    for kernel, frames in SCALES:
        latents = torch.randn(1, c_in, frames, args.height, args.width, device="cuda", dtype=latent_dtype)
        weight = torch.randn(dim, c_in, *kernel, device="cuda", dtype=torch.bfloat16) * 0.02
        scales.append((latents, weight, torch.zeros(dim, device="cuda", dtype=torch.bfloat16)))
    tokens = [token_count(x.shape, w.shape[2:]) for x, w, _ in scales]
    flops = sum(2 * n * w[0].numel() * dim for n, (_, w, _) in zip(tokens, scales))
    nbytes = sum(x.numel() * x.element_size() + w.numel() * w.element_size() for x, w, _ in scales)
    nbytes += sum(tokens) * dim * 2

    error = (fused_patchify(scales).float() - fused_patchify_reference(scales).float()).abs().max().item()
    print(f"{sum(tokens)} tokens {tokens}, max |err| vs eager {error:.2e}")
    rows = []
    for name, fn in (("triton_fused", lambda: fused_patchify(scales)),
                     ("torch_eager", lambda: fused_patchify_reference(scales))):
        t = bench.time_ms(fn, args.warmup, args.iters)
        row = {"impl": name, **t, "tflops": bench.tflops(flops, t["median_ms"]),
               "gbps": bench.gbps(nbytes, t["median_ms"])}
        rows.append(row)
        print(f"{name:>13}: {t['median_ms']:8.3f} ms  {row['tflops']:6.1f} TFLOP/s  {row['gbps']:7.1f} GB/s")
    print(f"speedup {rows[1]['median_ms'] / rows[0]['median_ms']:.2f}x")
    bench.write_json(__file__, args.json, {"benchmark": "patchify", "environment": env, "tokens": tokens,
                                           "max_abs_error": error, "results": rows})


if __name__ == "__main__":
    main()
