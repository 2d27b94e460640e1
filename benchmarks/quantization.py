"""fp8 weights at the 13B's widths: bytes against bf16, and the velocity's error against fp32 next to bf16's.

The released config (24 heads x 128, text 4096, MLP x4) with one double- and one single-stream block (the 13B
has 20 + 40 of each kind; per block the numbers are the same), random weights, F1 window-9 inputs at a small
latent size. CPU is fine:

    python benchmarks/quantization.py --latent 16 --json out.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import time

import torch

from framepack_rt import FramePackConfig, FramePackTransformer
from framepack_rt.commands.transformer_step import RELEASE_IMAGE_TOKENS, StepShapes, example_inputs
from framepack_rt.model.quantize import quantize_blocks, weight_bytes


def inputs(config: FramePackConfig, latent: int, text_len: int, seed: int = 0) -> dict:
    """F1 window-9 inputs of one step at latent ``latent`` x ``latent`` (the SigLIP image's 729 tokens): the
    inputs info and doctor time, drawn from ``seed``. benchmarks/lora.py uses them too."""
    shapes = StepShapes(latent, latent, text_len, RELEASE_IMAGE_TOKENS, steps=1)
    return example_inputs(config, shapes, seed=seed, timestep=700.0)


def block_bytes(model: torch.nn.Module) -> int:
    return weight_bytes(model.transformer_blocks) + weight_bytes(model.single_transformer_blocks)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latent", type=int, default=16, help="latent height = width (default 16: 128x128 pixels)")
    p.add_argument("--text", type=int, default=64, help="prompt tokens")
    p.add_argument("--seeds", type=int, default=3, help="input draws to average over")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    config = dataclasses.replace(FramePackConfig.preset("framepack-13b"), num_layers=1, num_single_layers=1)
    began = time.perf_counter()
    fp32 = FramePackTransformer.from_config(config).eval()
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    fp8 = copy.deepcopy(bf16)
    quantize_blocks(fp8)
    rows = []
    with torch.no_grad():
        for seed in range(args.seeds):
            x = inputs(config, args.latent, args.text, seed)
            want = fp32(**x)
            rows.append({"seed": seed, "bf16": relative_error(bf16(**x), want), "fp8": relative_error(fp8(**x), want)})
    result = {
        "benchmark": "quantization", "config": "framepack-13b widths, 1 double + 1 single block",
        "latent": args.latent, "text_tokens": args.text,
        "block_bytes": {"bf16": block_bytes(bf16), "fp8": block_bytes(fp8)},
        "model_bytes": {"bf16": weight_bytes(bf16), "fp8": weight_bytes(fp8)},
        "relative_error_vs_fp32": {k: sum(r[k] for r in rows) / len(rows) for k in ("bf16", "fp8")},
        "runs": rows,
        "environment": {"torch": torch.__version__, "machine": platform.processor() or platform.machine(),
                        "threads": torch.get_num_threads()},
        "seconds": round(time.perf_counter() - began, 1),
    }
    b = result["block_bytes"]
    e = result["relative_error_vs_fp32"]
    print(f"block weights: bf16 {b['bf16'] / 2**20:.1f} MiB, fp8 {b['fp8'] / 2**20:.1f} MiB "
          f"({b['fp8'] / b['bf16']:.3f}x)")
    print(f"velocity relative error vs fp32: bf16 {e['bf16']:.4f}, fp8 {e['fp8']:.4f} ({e['fp8'] / e['bf16']:.1f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
