"""Varlen attention at the 13B shapes: the Triton kernel against torch SDPA (flash backend) and flash-attn.

Default: 24 heads x 128, one joint sequence of 19,200 tokens (18,400 video tokens at 640x640, window 9, F1
context + ~800 image/text tokens), and a CFG-style pair of segments with different text lengths.
FLOPs = 4 * L^2 * heads * head_dim per segment (two matmuls, forward only).

    python benchmarks/bench_packed_attention.py [--seqlens 19200 19200,18700] [--json]
"""

from __future__ import annotations

from framepack_rt.kernels.bench import parser, require_cuda


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--seqlens", nargs="+", default=["19200", "19200,18700"],
                   help="cases, each comma-separated segment lengths")
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--head-dim", type=int, default=128)
    args = p.parse_args()
    require_cuda("bench_packed_attention")

    import importlib.util

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from framepack_rt.kernels import bench
    from framepack_rt.kernels import packed_attention as pa
    from framepack_rt.model.packing import cu_seqlens_of

    env = bench.environment()
    bench.print_environment(env)
    has_flash_attn = importlib.util.find_spec("flash_attn") is not None
    rows = []
    for case in args.seqlens:
        lengths = [int(n) for n in case.split(",")]
        total, heads, dim = sum(lengths), args.heads, args.head_dim
        q, k, v = (torch.randn(total, heads, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        cu = cu_seqlens_of(lengths, q.device)
        flops = pa.attention_flops(lengths, heads, dim)

        def triton_call():
            return pa.packed_attention(q, k, v, cu, max(lengths))

        def sdpa_call():  # flash backend; one call per segment (SDPA has no varlen entry point)
            outs, start = [], 0
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                for n in lengths:
                    seg = [t[start : start + n].transpose(0, 1).unsqueeze(0) for t in (q, k, v)]
                    outs.append(F.scaled_dot_product_attention(*seg)[0].transpose(0, 1))
                    start += n
            return torch.cat(outs)

        calls = {"triton": triton_call, "sdpa_flash": sdpa_call}
        if has_flash_attn:
            from flash_attn import flash_attn_varlen_func

            calls["flash_attn"] = lambda: flash_attn_varlen_func(q, k, v, cu, cu, max(lengths), max(lengths))
        error = (triton_call().float() - sdpa_call().float()).abs().max().item()
        for name, fn in calls.items():
            t = bench.time_ms(fn, args.warmup, args.iters)
            row = {"case": case, "impl": name, **t, "tflops": bench.tflops(flops, t["median_ms"])}
            if name == "triton":
                row["max_abs_error_vs_sdpa"] = error
                row["config"] = str(pa._packed_attention_tuned.best_config)
            rows.append(row)
            print(f"[{case}] {name:>10}: {t['median_ms']:8.3f} ms  {row['tflops']:7.1f} TFLOP/s"
                  + (f"  (max |err| vs SDPA {error:.2e}; {row['config']})" if name == "triton" else ""))
    bench.write_json(__file__, args.json, {"benchmark": "packed_attention", "environment": env, "results": rows})


if __name__ == "__main__":
    main()
