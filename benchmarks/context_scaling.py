"""O(1) shown, not claimed: section latency against section index, packed context vs full history.

Packed: the F1 schedule through the context ring (start + 16 latents at 4x + 2 at 2x + 1 at 1x), what
framepack-rt runs. Naive: the same model and sampler, but every past latent is given at full 1x resolution,
so its context, and its cost, grow with the video. Both series are printed side by side.

    python benchmarks/context_scaling.py --sections 16 --latent 16x16 --steps 4 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from framepack_rt import FramePackTransformer
from framepack_rt.engine.generator import Conditioning, SamplerConfig, SectionGenerator
from framepack_rt.engine.sampling import GuidanceConfig, NoiseSource, flow_seq_len, flow_shift, flow_sigmas, guided_denoiser, sample
from framepack_rt.engine.schedules import f1_schedule


class NaiveFullHistory:
    """Baseline: history grown with torch.cat and fed whole at 1x. Deliberately what not to do."""

    def __init__(self, model, start: torch.Tensor, cond: Conditioning, window: int, steps: int, seed: int) -> None:
        self.model, self.cond, self.window, self.steps = model, cond, window, steps
        self.history = start.clone()  # (B, 16, 1 + generated, H, W), start first
        self.noise = NoiseSource(seed)
        _, _, _, h, w = start.shape
        self.sigmas = flow_sigmas(steps, flow_shift(flow_seq_len(window, h, w)))

    def context_tokens(self) -> int:
        _, _, t, h, w = self.history.shape
        return t * h * w // 4

    def next_section(self) -> float:
        n = self.history.shape[2]
        kwargs = dict(
            latents_clean=self.history,
            indices_latents_clean=torch.arange(n),
            indices_latents=torch.arange(n, n + self.window),
        )
        cond = self.cond

        def velocity(x, timestep, guidance, _):
            return self.model(hidden_states=x, timestep=timestep, guidance=guidance, encoder_hidden_states=cond.text,
                              pooled_projections=cond.pooled, image_embeds=cond.image_embeds, **kwargs)

        b, c, _, h, w = self.history.shape
        x = self.noise.noise((b, c, self.window, h, w))
        began = time.perf_counter()
        with torch.no_grad():
            latents = sample(guided_denoiser(velocity, GuidanceConfig(), None), x, self.sigmas)
        ms = (time.perf_counter() - began) * 1000
        self.history = torch.cat([self.history, latents], dim=2)
        return ms


def packed_context_tokens(gen: SectionGenerator) -> int:
    kwargs = gen.ring.inputs(gen.schedule.layout(gen.sections_done)).as_kwargs()
    total = 0
    for name, kernel in (("latents_clean", (1, 2, 2)), ("latents_history_2x", (2, 4, 4)), ("latents_history_4x", (4, 8, 8))):
        t = kwargs[name]
        if t is not None:
            dims = [-(-s // k) for s, k in zip(t.shape[2:], kernel)]
            total += dims[0] * dims[1] * dims[2]
    return total


def run(sections: int, height: int, width: int, steps: int, window: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = FramePackTransformer.from_config("tiny").eval()
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    cond = Conditioning("a red ball moves right", torch.randn(1, 16, cfg.text_embed_dim, generator=g),
                        torch.randn(1, cfg.pooled_projection_dim, generator=g),
                        image_embeds=torch.randn(1, 16, cfg.image_proj_dim, generator=g))
    start = torch.randn(1, 16, 1, height, width, generator=g)

    packed = SectionGenerator(model, f1_schedule(window), start, cond, sampler=SamplerConfig(steps=steps), seed=seed)
    naive = NaiveFullHistory(model, start, cond, window, steps, seed)
    next(SectionGenerator(model, f1_schedule(window), start, cond, sampler=SamplerConfig(steps=steps)))  # warm-up
    rows = []
    for k in range(sections):
        packed_tokens, naive_tokens = packed_context_tokens(packed), naive.context_tokens()
        packed_ms = next(packed).ms
        naive_ms = naive.next_section()
        rows.append(dict(section=k + 1, packed_ms=packed_ms, naive_ms=naive_ms,
                         packed_context_tokens=packed_tokens, naive_context_tokens=naive_tokens))
    return dict(
        config=dict(model="tiny", sections=sections, latent=[height, width], steps=steps, window=window),
        machine=f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        rows=rows,
    )


def summarize(result: dict) -> str:
    rows = result["rows"]
    lines = [f"{'section':>7} {'packed ms':>10} {'ctx tok':>8} {'naive ms':>10} {'ctx tok':>8}"]
    for r in rows:
        lines.append(f"{r['section']:>7} {r['packed_ms']:>10.1f} {r['packed_context_tokens']:>8} "
                     f"{r['naive_ms']:>10.1f} {r['naive_context_tokens']:>8}")
    q = max(1, len(rows) // 4)
    first = lambda key: statistics.median(r[key] for r in rows[:q])  # noqa: E731
    last = lambda key: statistics.median(r[key] for r in rows[-q:])  # noqa: E731
    lines.append(f"last/first quarter median latency: packed {last('packed_ms') / first('packed_ms'):.2f}x, "
                 f"naive {last('naive_ms') / first('naive_ms'):.2f}x   ({result['machine']})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", type=int, default=16)
    parser.add_argument("--latent", default="16x16", help="latent HxW (pixels / 8)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--window", type=int, default=9)
    parser.add_argument("--json", help="write the series here")
    args = parser.parse_args()
    height, width = (int(v) for v in args.latent.split("x"))
    result = run(args.sections, height, width, args.steps, args.window)
    print(summarize(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
