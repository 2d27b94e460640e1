"""Gated residual + AdaLN modulate at the 13B shapes: the fused Triton kernel against the eager torch lines.

The double-stream block's ``x = x + attn_x * gate; h = layer_norm(x) * (1 + scale) + shift`` on the video
stream (1, 18,400, 3072) bf16 with per-sample vectors (chunk() views of the AdaLN projection), and the plain
modulate (no residual) of the blocks' first AdaLN. Bandwidth counts each (tokens, C) tensor read or written
once: 2 reads + 2 writes with the residual, 1 + 1 without.

    python benchmarks/bench_adaln.py [--tokens 18400] [--json]
"""

from __future__ import annotations

from framepack_rt.kernels.bench import parser, require_cuda


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=18400)
    args = p.parse_args()
    require_cuda("bench_adaln")

    import torch

    from framepack_rt.kernels import bench
    from framepack_rt.kernels.adaln import residual_gate_modulate, residual_gate_modulate_reference

    env = bench.environment()
    bench.print_environment(env)
    dim = 3072
    x = torch.randn(1, args.tokens, dim, device="cuda", dtype=torch.bfloat16)
    y = torch.randn_like(x)
    emb = torch.randn(1, 3 * dim, device="cuda", dtype=torch.bfloat16)  # the AdaLN projection's output
    gate, shift, scale = (m[:, None] for m in emb.chunk(3, -1))  # strided per-sample views, as in the model
    rows = []
    for case, residual in (("residual+modulate", y), ("modulate", None)):
        nbytes = (4 if residual is not None else 2) * x.numel() * 2
        got = residual_gate_modulate(x, residual, gate, shift, scale)
        want = residual_gate_modulate_reference(x, residual, gate, shift, scale)
        error = max((a.float() - b.float()).abs().max().item() for a, b in zip(got, want))
        rows += bench.fused_vs_eager(
            case, lambda: residual_gate_modulate(x, residual, gate, shift, scale),
            lambda: residual_gate_modulate_reference(x, residual, gate, shift, scale), nbytes, error,
            args.warmup, args.iters)
    bench.write_json(__file__, args.json, {"benchmark": "adaln", "environment": env, "results": rows})


if __name__ == "__main__":
    main()
