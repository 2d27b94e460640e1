"""LoRA at the 13B's widths: the cost of unmerged adapters per forward against fused and none, and their bytes.

The released config with one double- and one single-stream block (per block the numbers hold for all 60),
random weights, a rank-R adapter (kohya layout, written to a temporary file) on every linear of both blocks,
as HunyuanVideo LoRAs are trained; F1 window-9 inputs at a small latent size. CPU is fine:

    python benchmarks/lora.py --latent 16 --rank 32 --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from framepack_rt import FramePackConfig, FramePackTransformer
from framepack_rt.commands.transformer_step import RELEASE_IMAGE_TOKENS, StepShapes, example_inputs
from framepack_rt.model.lora import LoraSet, linear_targets


def write_adapter(model: torch.nn.Module, rank: int, path: Path) -> int:
    """A kohya-layout rank-``rank`` LoRA on every linear of the blocks; returns its parameter count."""
    g = torch.Generator().manual_seed(1)
    state = {}
    for name, module in linear_targets(model).items():
        if name.startswith(("transformer_blocks.", "single_transformer_blocks.")):
            key = "lora_unet_" + name.replace(".", "_")
            state[f"{key}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=g) / module.in_features**0.5
            state[f"{key}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=g) * 1e-3
            state[f"{key}.alpha"] = torch.tensor(float(rank))
    save_file(state, str(path))
    return sum(t.numel() for k, t in state.items() if not k.endswith("alpha"))


def timed(model: torch.nn.Module, kwargs: dict, repeats: int) -> float:
    """Median ms of ``repeats`` forwards (after one warm-up)."""
    with torch.no_grad():
        model(**kwargs)
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            model(**kwargs)
            times.append((time.perf_counter() - began) * 1000)
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latent", type=int, default=16, help="latent height = width (default 16: 128x128 pixels)")
    p.add_argument("--text", type=int, default=64, help="prompt tokens")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    config = dataclasses.replace(FramePackConfig.preset("framepack-13b"), num_layers=1, num_single_layers=1)
    model = FramePackTransformer.from_config(config).eval()
    # F1 window-9 inputs of one step, as info, doctor and benchmarks/quantization.py build them.
    kwargs = example_inputs(config, StepShapes(args.latent, args.latent, args.text, RELEASE_IMAGE_TOKENS, steps=1),
                            timestep=700.0)
    result = {"latent": args.latent, "rank": args.rank, "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    result["none_ms"] = timed(model, kwargs, args.repeats)
    print(f"no LoRA: {result['none_ms']:.0f} ms", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.safetensors"
        params = write_adapter(model, args.rank, path)
        loras = LoraSet(model)
        began = time.perf_counter()
        loras.load(path, scale=1.0)
        result["load_ms"] = (time.perf_counter() - began) * 1000
    result["adapter_params_per_double_plus_single_block"] = params
    result["unmerged_ms"] = timed(model, kwargs, args.repeats)
    print(f"unmerged: {result['unmerged_ms']:.0f} ms", flush=True)
    began = time.perf_counter()
    loras.fuse()
    result["fuse_ms"] = (time.perf_counter() - began) * 1000
    result["fused_ms"] = timed(model, kwargs, args.repeats)
    result["unmerged_overhead"] = result["unmerged_ms"] / result["fused_ms"] - 1
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
