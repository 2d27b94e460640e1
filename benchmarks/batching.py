"""Continuous batching against round-robin: aggregate generated frames/s of N sessions on one device.

    python benchmarks/batching.py                                  # demo model, 1 2 4 8 sessions, both workers
    python benchmarks/batching.py --model tiny --sessions 1 2 --json out.json --plot out.png

Runs the server's own device workers without WebRTC: N sessions (the model's example start, prompts and seeds
differing per session, equal settings) each push into a bounded buffer that a thread drains at once, so the
device never waits for playback. ``round-robin`` is stream/generation.py's DeviceWorker (a whole section of one
session at a time, the pipeline's default decode overlap); ``batched`` is stream/batching.py's BatchingWorker
(every open section advances one step per packed forward, sections finishing together decode in one VAE batch).
Each session first completes ``--warmup`` sections; the figure counts the frames of all sections that arrive
between the moment every session is warm and the moment the first session completes ``--warmup + --sections``,
over that span (wall time), and the same frames per CPU-second of this process over that span (all its threads;
with ``--threads 1`` it is the work per frame, which other processes on a shared machine barely change, while
wall-clock figures follow their load). Also reported: each session's frames/s over its measured sections
(fairness: max/min), and the batched worker's rounds (steps of all open sections).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time

import numpy as np
import torch

from framepack_rt.pipeline import devices
from framepack_rt.stream import DEFAULT_MODEL

MODES = ("round-robin", "batched")


def measure(pipe, mode: str, sessions: int, warmup: int, sections: int, max_batch: int, timeout: float) -> dict:
    """One configuration: aggregate and per-session generated frames/s."""
    from framepack_rt.stream.batching import BatchingWorker
    from framepack_rt.stream.buffer import FrameBuffer
    from framepack_rt.stream.generation import DeviceWorker, Generation

    worker = BatchingWorker("bench", max_batch) if mode == "batched" else DeviceWorker("bench")
    image, prompt = pipe.example if pipe.example is not None else (_fallback_image(), "a red ball moves right")
    arrivals: list[list[tuple[float, float, int]]] = [[] for _ in range(sessions)]  # (wall, CPU, frames)
    jobs = []
    for i in range(sessions):
        buffer = FrameBuffer(1000, on_space=worker.wake)
        job = Generation(buffer, lambda m: None,
                         on_section=lambda count, _s, mine=arrivals[i]: mine.append(
                             (time.monotonic(), time.process_time(), count)))
        text = prompt if i % 2 == 0 else prompt.replace("right", "left")  # other prompts, same settings
        job.attach(pipe.stream(image, text, seed=i, decode_overlap=None if mode == "round-robin" else False))
        jobs.append(job)
    stop = threading.Event()
    drainer = threading.Thread(target=_drain, args=([j.buffer for j in jobs], stop), daemon=True)
    drainer.start()
    began, cpu_began = time.monotonic(), time.process_time()
    try:
        for job in jobs:
            worker.add(job)
        need = warmup + sections
        while min(len(a) for a in arrivals) < need and time.monotonic() - began < timeout:
            if any(job.error for job in jobs):
                raise RuntimeError(next(job.error for job in jobs if job.error))
            time.sleep(0.02)
    finally:
        for job in jobs:
            worker.remove(job)
            job.buffer.close()
        worker.close(60)
        stop.set()
        drainer.join(5)
    if min(len(a) for a in arrivals) < warmup + 1:
        raise RuntimeError(f"{mode} x{sessions}: sessions did not get past warm-up within {timeout:.0f} s")
    first = max((a[warmup - 1] for a in arrivals), key=lambda e: e[0]) if warmup else (began, cpu_began, 0)
    last = min((a[min(len(a), warmup + sections) - 1] for a in arrivals), key=lambda e: e[0])
    frames = sum(n for a in arrivals for t, _, n in a if first[0] < t <= last[0])
    per_session = []
    for a in arrivals:
        done = a[warmup : warmup + sections]
        t0 = a[warmup - 1][0] if warmup else began
        per_session.append(sum(n for _, _, n in done) / (done[-1][0] - t0) if done else 0.0)
    span, cpu = last[0] - first[0], last[1] - first[1]
    result = {"mode": mode, "sessions": sessions, "aggregate_fps": frames / span if span > 0 else 0.0,
              "frames_per_cpu_s": frames / cpu if cpu > 0 else 0.0,
              "span_s": span, "cpu_s": cpu, "frames": frames, "per_session_fps": per_session,
              "fairness_max_over_min": max(per_session) / min(per_session) if min(per_session) > 0 else None,
              "wall_s": time.monotonic() - began}
    if mode == "batched":
        result["rounds"] = worker.rounds
    return result


def _drain(buffers, stop: threading.Event) -> None:
    while not stop.is_set():
        for b in buffers:
            while b.get_nowait() is not None:
                pass
        time.sleep(0.002)


def _fallback_image() -> np.ndarray:
    image = np.full((64, 64, 3), 30, np.uint8)
    image[24:40, 8:24] = (220, 40, 40)
    return image


def plot(results: list[dict], path: str) -> str:
    """A PNG of aggregate frames/s against sessions, one line per worker; or why there is none."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed (pip install matplotlib)"
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for mode in MODES:
        rows = [r for r in results if r["mode"] == mode]
        ax.plot([r["sessions"] for r in rows], [r["aggregate_fps"] for r in rows], marker="o", label=mode)
    ax.set_xlabel("sessions")
    ax.set_ylabel("generated frames/s, all sessions")
    ax.set_xscale("log", base=2)
    ax.axhline(30, color="grey", lw=0.5, ls="--")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return f"plot: {path}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--warmup", type=int, default=1, help="sections each session runs before measuring")
    parser.add_argument("--sections", type=int, default=3, help="measured sections per session")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=600.0, help="per configuration, seconds")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); 1 makes frames per CPU-second a load-robust figure")
    devices.add_decoder_argument(parser)  # --decoder auto|vae|fast
    parser.add_argument("--json", default="benchmarks/results/batching.json")
    parser.add_argument("--plot", default="benchmarks/results/batching.png")
    args = parser.parse_args()

    from framepack_rt.pipeline.framepack_pipeline import FramePackPipeline, resolve_decoder

    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = FramePackPipeline.from_pretrained(args.model, decoder=args.decoder)
    decoder = resolve_decoder(pipe.parts.vae().fast is not None, args.decoder)
    results = []
    for n in args.sessions:
        for mode in MODES:  # both workers at each N, back to back: the same machine load
            r = measure(pipe, mode, n, args.warmup, args.sections, args.max_batch, args.timeout)
            results.append(r)
            print(f"{mode:>11} x{n}: {r['aggregate_fps']:6.1f} frames/s in all ({r['frames_per_cpu_s']:.1f} per "
                  f"CPU-second), per session {min(r['per_session_fps']):.1f}-{max(r['per_session_fps']):.1f}",
                  flush=True)
        rr, b = results[-2], results[-1]
        if rr["aggregate_fps"] and rr["frames_per_cpu_s"]:
            print(f"   x{n}: batched / round-robin = {b['aggregate_fps'] / rr['aggregate_fps']:.2f} (wall), "
                  f"{b['frames_per_cpu_s'] / rr['frames_per_cpu_s']:.2f} (CPU time)", flush=True)
    load = os.getloadavg()
    report = {"model": args.model, "decoder": decoder, "results": results, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "load_average_after": load, "warmup": args.warmup, "sections": args.sections,
              "max_batch": args.max_batch}
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    print(f"json: {args.json}; {plot(results, args.plot)}; load average after {load[0]:.1f}")


if __name__ == "__main__":
    main()
