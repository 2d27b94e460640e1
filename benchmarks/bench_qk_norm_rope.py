"""q/k RMSNorm + RoPE at the 13B shapes: the fused Triton kernel against the model's eager torch lines.

Video q (or k) of one 640x640 window-9 F1 step: (1, 18,400, 24, 128) bf16, a view of the (1, 18,400, 3072)
projection, with one shared fp32 (1, 18,400, 128) cos/sin table; and the context q without RoPE. Eager torch =
RMSNorm (fp32 statistics, bf16 weight) then apply_rope (fp32). Bandwidth counts x read once, the result
written once and the tables read once.

    python benchmarks/bench_qk_norm_rope.py [--tokens 18400] [--json]
"""

from __future__ import annotations

from framepack_rt.kernels.bench import parser, require_cuda


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=18400)
    p.add_argument("--context-tokens", type=int, default=829)
    args = p.parse_args()
    require_cuda("bench_qk_norm_rope")

    import torch

    from framepack_rt.kernels import bench
    from framepack_rt.kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_reference

    env = bench.environment()
    bench.print_environment(env)
    heads, head_dim = 24, 128
    weight = (1 + 0.1 * torch.randn(head_dim, device="cuda")).to(torch.bfloat16)
    rows = []
    for case, tokens, rope in (("video+rope", args.tokens, True), ("context-norm", args.context_tokens, False)):
        x = torch.randn(1, tokens, heads * head_dim, device="cuda", dtype=torch.bfloat16).unflatten(-1, (heads, -1))
        cos = sin = None
        nbytes = 2 * x.numel() * 2
        if rope:
            angles = torch.rand(1, tokens, head_dim, device="cuda") * 6.28
            cos, sin = angles.cos(), angles.sin()
            nbytes += 2 * cos.numel() * 4
        error = (qk_norm_rope(x, weight, cos, sin).float() - qk_norm_rope_reference(x, weight, cos, sin).float())
        error = error.abs().max().item()
        rows += bench.fused_vs_eager(case, lambda: qk_norm_rope(x, weight, cos, sin),
                                     lambda: qk_norm_rope_reference(x, weight, cos, sin), nbytes, error,
                                     args.warmup, args.iters)
    bench.write_json(__file__, args.json, {"benchmark": "qk_norm_rope", "environment": env, "results": rows})


if __name__ == "__main__":
    main()
