"""``framepack-rt bench`` (and benchmarks/latency.py): streaming latency end to end, over real WebRTC.

Starts the server in-process on a free loopback port (or targets ``--url``), connects viewers through the
Python aiortc client (and, with ``--browser``, a headless Chromium page), changes the prompt midway and
measures time to first frame, section latency, generation vs playback fps, frame-interval percentiles,
jitter and deadline misses, prompt-to-effect and glass-to-glass latency (frame numbers stamped into the
pixels, see stream/stamp.py) and the encoder's time per frame. ``--scaling`` adds section latency against
section index beside the naive full-history baseline (benchmarks/context_scaling.py); ``--viewers-sweep``
adds latency against 1, 2, 4, 8 viewers of one session. Definitions: :mod:`framepack_rt.bench.report`.

    python benchmarks/latency.py --json out.json                     # the demo model; + out.png
    python benchmarks/latency.py --model tiny --json out.json        # random weights, 2 steps: the tests' model
"""

from __future__ import annotations

import argparse
import os
import asyncio
import importlib.util
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

from framepack_rt.bench import report
from framepack_rt.commands import model_flag
from framepack_rt.pipeline import devices
from framepack_rt.pipeline.builtin import DEFAULT_MODEL

SWEEP = (1, 2, 4, 8)
MAX_VIEWERS = 8  # what a server takes per session by default (stream/limits.py)


@dataclass
class BenchConfig:
    """What to measure. The model is every command's default (the demo); the other defaults keep a run on a
    2-core CPU well under two minutes."""

    model: str = DEFAULT_MODEL
    device: str = "auto"  # --device / --dtype: framepack_rt.pipeline.devices names (in-process server only)
    dtype: str = "auto"
    decoder: str = "auto"  # --decoder: the in-process server's frame decoder (auto: the model's fast one if any)
    url: str | None = None  # a running server instead of an in-process one
    token: str | None = field(default=None, repr=False)  # that server's --token (never printed or saved)
    viewers: int = 1
    seconds: float = 16.0  # streaming measured, from the first generated frame
    prompt_after: float = 5.0  # the prompt change, seconds after the first generated frame
    steps: int | None = None  # None: 2 for tiny (fast enough for 30 fps on a CPU), else the model's default
    fps: float = 30.0
    window: int = 9
    buffer_seconds: float = 2.0
    stamp: bool = True
    browser: bool = False
    scaling: bool = False
    viewers_sweep: bool = False
    sweep_seconds: float = 3.0
    scaling_sections: int = 12
    prompt: str = "a paper boat drifts on a calm lake"
    new_prompt: str = "a storm rolls over the lake and the boat rocks"
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.viewers + self.browser <= MAX_VIEWERS:
            raise ValueError(f"--viewers {self.viewers}{' + --browser' if self.browser else ''}: between 1 and "
                             f"{MAX_VIEWERS} viewers, the server's default limit per session")
        if not 0 < self.prompt_after < self.seconds:
            raise ValueError(f"--prompt-after {self.prompt_after:g} must be within the {self.seconds:g} s run")
        if self.sweep_seconds <= 0 or self.scaling_sections < 1:
            raise ValueError("--sweep-seconds must be > 0 and --scaling-sections >= 1")
        if self.steps is None and self.model == "tiny":
            self.steps = 2


class EncoderTimer:
    """Times aiortc's video encoders (VP8, H.264) ``encode`` calls while active: the server's real encodes,
    one per viewer per frame. Wraps the classes' methods and restores them on exit (in-process runs only)."""

    def __init__(self) -> None:
        self.samples: list[tuple[str, float]] = []  # (encoder class, ms)
        self._saved: dict[type, Any] = {}

    def __enter__(self) -> "EncoderTimer":
        from aiortc.codecs.h264 import H264Encoder
        from aiortc.codecs.vpx import Vp8Encoder

        for cls in (Vp8Encoder, H264Encoder):
            original = self._saved[cls] = cls.__dict__["encode"]

            def timed(encoder: Any, frame: Any, force_keyframe: bool = False, _original: Any = original,
                      _name: str = cls.__name__) -> Any:
                began = time.perf_counter()
                try:
                    return _original(encoder, frame, force_keyframe)
                finally:  # list.append is atomic: encodes run on executor threads
                    self.samples.append((_name, (time.perf_counter() - began) * 1000))

            cls.encode = timed
        return self

    def __exit__(self, *exc: object) -> None:
        for cls, original in self._saved.items():
            cls.encode = original

    @property
    def ms(self) -> list[float]:
        return [ms for _, ms in self.samples]


# -- server and viewers -------------------------------------------------------------------------------------

def load_warm_pipeline(cfg: BenchConfig) -> tuple[Any, float]:
    """Load the model and run one section, so torch's slow first calls are not measured as streaming."""
    from framepack_rt.stream.images import default_scene
    from framepack_rt.stream.server import load_pipeline

    began = time.monotonic()
    pipe = load_pipeline(cfg.model, device=cfg.device, dtype=cfg.dtype, decoder=cfg.decoder)
    stream = pipe.stream(default_scene(), "warm-up", steps=cfg.steps, window=cfg.window)
    next(stream)
    stream.stop()
    return pipe, time.monotonic() - began


@asynccontextmanager
async def serving(cfg: BenchConfig, pipe: Any) -> AsyncIterator[tuple[str, Any]]:
    """(url, in-process StreamServer or None for ``--url``); the in-process server always stops."""
    if cfg.url:
        yield cfg.url, None
        return
    from framepack_rt.stream.server import ServerSettings, StreamServer

    settings = ServerSettings(model=cfg.model, fps=cfg.fps, window=cfg.window, steps=cfg.steps,
                              buffer_seconds=cfg.buffer_seconds, stamp=cfg.stamp)
    server = StreamServer(pipe, settings)
    url = await server.start("127.0.0.1", 0)
    try:
        yield url, server
    finally:
        await server.stop()


async def sent_times(client: Any, server: Any, session: str) -> tuple[dict[int, float], str]:
    """Frame number -> server send time (time.monotonic()), and where it came from ("" if unavailable)."""
    if server is not None:
        log = server.sessions[session].track.stamps if session in server.sessions else None
        return ({r.index: r.sent for r in log.since(0)} if log else {}), "in-process"
    before = time.monotonic()
    try:
        data = await client.get_json(f"/api/sessions/{session}/stamps?since=0")
    except RuntimeError:  # 404: an older server, or one started without --stamp
        return {}, ""
    after = time.monotonic()
    # Monotonic clocks of different hosts are unrelated: the server's "now" must fall inside our request.
    if not before - 0.01 <= data["now"] <= after + 0.01:
        return {}, ""
    return {int(r[0]): float(r[3]) for r in data["stamps"]}, "stamps endpoint (same host)"


def viewer_record(name: str, client: Any) -> report.ViewerRecord:
    frames = list(client.frames)
    return report.ViewerRecord(name, client.offer_sent or 0.0, [f.mono for f in frames], [f.stamp for f in frames])


async def wait_until(predicate: Any, timeout: float, what: str, poll: float = 0.01) -> float:
    """Poll until ``predicate()``; returns time.monotonic() when it held. TimeoutError says ``what``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout:g} s")
        await asyncio.sleep(poll)
    return time.monotonic()


def first_generated(client: Any) -> float | None:
    """Arrival of the first stamped (generated) frame, None before it."""
    return next((f.mono for f in client.frames if f.stamp is not None), None)


async def wait_first_generated(client: Any, stamped: bool, timeout: float = 60.0) -> tuple[float, bool]:
    """(when generated frames began at ``client``, whether they carry stamps). The first "section" message
    follows the section's frames into the buffer, so stamped frames show up within moments of it."""
    await client.wait_for("section", timeout)
    began = time.monotonic()
    if stamped:
        try:
            await wait_until(lambda: first_generated(client) is not None, 3.0, "stamped frame")
            return first_generated(client), True
        except TimeoutError:  # a --url server started without --stamp
            pass
    return began, False


def sections_of(client: Any) -> list[dict[str, Any]]:
    return [m for m in client.messages if m.get("type") == "section"]


def stats_after_first_section(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The server's once-a-second "stats" messages from when generated frames began to play."""
    first = next((i for i, m in enumerate(messages) if m.get("type") == "section"), len(messages))
    return [m for m in messages[first:] if m.get("type") == "stats"]


# -- the measurements ---------------------------------------------------------------------------------------

async def measure(cfg: BenchConfig, url: str, server: Any) -> tuple[report.RunRecord, dict[str, Any]]:
    """One session: viewers connect, stream, one prompt change; returns the raw record and context."""
    from framepack_rt.bench.browser import BrowserViewer
    from framepack_rt.stream.client import StreamClient

    keep = 30 if server is None else False  # remote: the encode time is measured on received frames
    clients = [StreamClient(url, keep_frames=keep if i == 0 else False, stamps=cfg.stamp, token=cfg.token) for i in range(cfg.viewers)]
    browser: BrowserViewer | None = None
    try:
        session = await clients[0].connect(prompt=cfg.prompt, seed=cfg.seed)
        for c in clients[1:]:
            await c.connect(session=session)
        start, stamped = await wait_first_generated(clients[0], cfg.stamp)
        size = (clients[0].frames[0].height, clients[0].frames[0].width)
        if cfg.browser:
            browser = BrowserViewer(url, session, *size, token=cfg.token)
            await browser.start()
        await asyncio.sleep(max(0.0, start + cfg.prompt_after - time.monotonic()))
        prompt_sent = time.monotonic()
        ack = await clients[0].send_prompt(cfg.new_prompt, id="bench")
        seen = time.monotonic()
        if stamped:
            def effect() -> bool:
                v = viewer_record("", clients[0])
                return report.prompt_to_effect_ms(v.arrivals, v.stamps, sections_of(clients[0]), cfg.new_prompt,
                                                  prompt_sent, int(ack["section"])) is not None
            seen = await wait_until(effect, 60.0, "frame generated under the new prompt", poll=0.05)
        await asyncio.sleep(max(0.0, max(start + cfg.seconds, seen + 1.0) - time.monotonic()))
        end = time.monotonic()
        sent, sent_source = await sent_times(clients[0], server, session) if stamped else ({}, "")
        browser_view = await browser.finish() if browser is not None else None
        browser = None
        views = [viewer_record(f"viewer {i}", c) for i, c in enumerate(clients)]
        kept = clients[0].frames_array() if keep else None
    finally:
        if browser is not None:
            await browser.close()
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
    run = report.RunRecord(cfg.fps, views, sections_of(clients[0]), sent, start, end, cfg.new_prompt,
                           prompt_sent, int(ack["section"]))
    # The transformer's resolution: the frames' own, unless a fast decoder draws them larger (the hello says).
    hello = next((m for m in clients[0].messages if m.get("type") == "hello"), {})
    bucket = (hello.get("settings") or {}).get("bucket") or list(size)  # a server without it: the frames' size
    context = {"session": session, "frame_size": list(size), "bucket": list(bucket), "sent_source": sent_source,
               "browser": browser_view, "kept_frames": kept,
               "stats": stats_after_first_section(clients[0].messages)}
    return run, context


async def viewers_sweep(cfg: BenchConfig, url: str, server: Any) -> list[dict[str, Any]]:
    """One new session; viewers join until 1, 2, 4, 8 watch it; each step measured over ``sweep_seconds``."""
    from framepack_rt.stream.client import StreamClient

    clients: list[Any] = []
    rows = []
    session, stamped = None, False
    try:
        for n in SWEEP:
            added = []
            while len(clients) < n:
                client = StreamClient(url, stamps=cfg.stamp, token=cfg.token)
                clients.append(client)  # before connecting, so that a failed connect is still closed
                session = await client.connect(session=session, prompt=None if session else cfg.prompt)
                added.append(client)
            await wait_until(lambda added=added: all(c.frames for c in added), 30.0, "first frame at every new viewer")
            if n == SWEEP[0]:
                stamped = (await wait_first_generated(clients[0], cfg.stamp))[1]
            t0 = time.monotonic()
            await asyncio.sleep(cfg.sweep_seconds)
            t1 = time.monotonic()
            sent, _ = await sent_times(clients[0], server, session) if stamped else ({}, "")
            views = [viewer_record(str(i), c).window(t0, t1) for i, c in enumerate(clients)]
            ttff = [v.ttff_ms for v in (viewer_record("", c) for c in added)]
            intervals = [i for v in views for i in report.intervals_ms(v.arrivals)]
            g2g = [ms for v in views for _, ms in report.glass_to_glass(v.arrivals, v.stamps, sent)]
            rows.append(report.rounded({
                "viewers": n, "ttff_ms": report.percentile(ttff, 50),
                "frame_interval_ms_p95": report.percentile(intervals, 95),
                "glass_to_glass_ms_p50": report.percentile(g2g, 50),
                "deadline_miss_rate": report.deadline_miss_rate(intervals, cfg.fps)}))
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
    return rows


def section_scaling(cfg: BenchConfig, bucket: list[int]) -> dict[str, Any]:
    """benchmarks/context_scaling.run at this run's latent size (``bucket``: the transformer's resolution in
    pixels): packed vs naive full history."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "context_scaling.py"
    if not path.is_file():
        raise RuntimeError(f"--scaling needs the repository checkout ({path} not found)")
    spec = importlib.util.spec_from_file_location("framepack_context_scaling", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.run(cfg.scaling_sections, bucket[0] // 8, bucket[1] // 8, cfg.steps or 2, cfg.window)
    rows = [report.rounded(r) for r in result["rows"]]
    q = max(1, len(rows) // 4)

    def growth(key: str) -> float:
        """Mean of the last quarter over the first: about 1 for O(1) per section."""
        return round(sum(r[key] for r in rows[-q:]) / max(1e-9, sum(r[key] for r in rows[:q])), 2)

    return {"config": result["config"], "rows": rows,
            "last_over_first_quarter": {"packed": growth("packed_ms"), "naive": growth("naive_ms")}}


def local_encode_ms(frames: Any) -> list[float]:
    """Remote servers: encode the received frames here with aiortc's VP8 encoder (its default settings)."""
    import fractions

    import av
    from aiortc.codecs.vpx import Vp8Encoder

    encoder, out = Vp8Encoder(), []
    for i, rgb in enumerate(frames):
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
        frame.pts, frame.time_base = i * 3000, fractions.Fraction(1, 90_000)
        began = time.perf_counter()
        encoder.encode(frame, i == 0)
        out.append((time.perf_counter() - began) * 1000)
    return out[1:]  # the first is a keyframe that sets the encoder up


async def bench(cfg: BenchConfig, pipe: Any = None) -> tuple[dict[str, Any], report.RunRecord, dict[str, Any]]:
    """Run everything asked for; returns (the JSON result, the main run's record, printed-only extras)."""
    async with serving(cfg, pipe) as (url, server):
        if server is None:  # the remote server's settings decide the nominal fps
            from framepack_rt.stream.client import StreamClient

            remote = await StreamClient(url, token=cfg.token).get_json("/api/config")
            cfg.fps, cfg.steps, cfg.window = float(remote["fps"]), remote.get("steps"), remote.get("window", 9)
            cfg.model = str(remote.get("model", "unknown"))
        timer = EncoderTimer()
        with timer:
            run, context = await measure(cfg, url, server)
        sweep = await viewers_sweep(cfg, url, server) if cfg.viewers_sweep else None
    if server is not None:
        run.encode_ms, encode_source = timer.ms, "server: aiortc encoder encode() per viewer per frame"
        codec = sorted({name for name, _ in timer.samples})
    else:
        kept = context["kept_frames"]
        run.encode_ms = local_encode_ms(kept) if kept is not None and len(kept) > 1 else []
        encode_source, codec = "local: aiortc Vp8Encoder on received frames (remote server)", ["unknown (remote)"]
    metrics = report.summarize(run)
    play_source = "stamps: distinct frames decoded by viewer 0 per second"
    if metrics["play_fps"] is None:  # no stamps: the server's own count of new frames played, from its stats
        stats = [m["play_fps"] for m in context["stats"] if "play_fps" in m]
        metrics["play_fps"] = report.percentile(stats, 50)
        play_source = "server stats messages (median of play_fps)"
    result: dict[str, Any] = report.rounded(metrics)
    scaling = None
    if cfg.scaling or sweep:
        scaling = {"sections": None, "viewers": sweep,
                   "viewers_note": "ttff: median over the viewers that joined at that count; the first viewer "
                                   "also starts the session. Intervals and glass-to-glass pool all viewers."}
        if cfg.scaling:
            scaling["sections"] = await asyncio.to_thread(section_scaling, cfg, context["bucket"])
            scaling["sections"]["stream"] = [[s["index"], s["ms"]] for s in run.sections]
    settings = {k: v for k, v in asdict(cfg).items() if k != "token"}  # the token never lands in a report
    result["config"] = {**settings, "url": cfg.url or "in-process", "frame_size": context["frame_size"],
                        "bucket": context["bucket"],
                        "encoders": codec, "encode_source": encode_source,
                        "glass_to_glass_source": context["sent_source"] or "unavailable",
                        "play_fps_source": play_source,
                        "miss_rule": f"interval > {report.MISS_FACTOR}/fps", "definitions": report.DEFINITIONS}
    result["machine"] = report.machine_info()
    result["scaling"] = scaling
    if context["browser"] is not None:
        browser_run = report.RunRecord(cfg.fps, [context["browser"]], run.sections, run.sent, run.start, run.end,
                                       run.prompt, run.prompt_sent, run.ack_section)
        b = report.summarize(browser_run)
        keys = ("ttff_ms", "frame_interval_ms_p50", "frame_interval_ms_p95", "frame_interval_ms_p99", "jitter_ms",
                "deadline_miss_rate", "prompt_to_effect_ms", "glass_to_glass_ms_p50", "glass_to_glass_ms_p95")
        result["browser"] = report.rounded({k: b[k] for k in keys})
        run.plotted_only.append(context["browser"])
    first = run.viewers[0].window(run.start, run.end)
    first_new = (run.start - run.viewers[0].offer) * 1000 if context["sent_source"] else None
    extras = {"first generated frame": first_new,  # ms from the offer: the session start, then section 0
              "sections streamed": len(run.sections), "frames at viewer 0": len(first.arrivals),
              "held share, viewer 0": report.held_fraction(first),
              "stamps read, viewer 0": sum(s is not None for s in first.stamps) / max(1, len(first.stamps))}
    return result, run, extras


# -- command line -------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = BenchConfig()
    model_flag.add_argument(parser)
    devices.add_arguments(parser)  # --device, --dtype
    devices.add_decoder_argument(parser)
    parser.add_argument("--url", help="measure a running `framepack-rt serve` instead of an in-process server")
    parser.add_argument("--token", default=os.environ.get("FRAMEPACK_RT_TOKEN"),
                        help="that server's access token (default: $FRAMEPACK_RT_TOKEN)")
    parser.add_argument("--viewers", type=int, default=d.viewers, help="Python viewers of the session (default: 1)")
    parser.add_argument("--seconds", type=float, default=d.seconds, help=f"streaming measured (default: {d.seconds:g})")
    parser.add_argument("--prompt-after", type=float, default=d.prompt_after,
                        help=f"seconds into the run to change the prompt (default: {d.prompt_after:g})")
    parser.add_argument("--steps", type=int, help="sampling steps per section (default: the model's; 2 for tiny)")
    parser.add_argument("--fps", type=float, default=d.fps, help="playback fps (default: 30)")
    parser.add_argument("--window", type=int, default=d.window, help="latent frames per section (default: 9)")
    parser.add_argument("--buffer", type=float, default=d.buffer_seconds, metavar="SECONDS",
                        help="the server's frame buffer (default: 2)")
    parser.add_argument("--no-stamp", action="store_true",
                        help="no frame numbers in the pixels: no glass-to-glass or prompt-to-effect")
    parser.add_argument("--browser", action="store_true", help="add a headless Chromium viewer (/usr/bin/chromium)")
    parser.add_argument("--scaling", action="store_true", help="section latency vs section index, packed vs naive")
    parser.add_argument("--viewers-sweep", action="store_true", help="latency vs 1, 2, 4, 8 viewers of one session")
    parser.add_argument("--sweep-seconds", type=float, default=d.sweep_seconds,
                        help=f"measured per viewer count (default: {d.sweep_seconds:g})")
    parser.add_argument("--scaling-sections", type=int, default=d.scaling_sections,
                        help=f"sections of the packed/naive series (default: {d.scaling_sections})")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--plot", help="PNG of per-frame latency (default: next to --json)")


def run_cli(args: argparse.Namespace) -> int:
    began = time.monotonic()
    cfg = BenchConfig(model=args.model, device=args.device, dtype=args.dtype, decoder=args.decoder, url=args.url,
                      token=args.token,
                      viewers=args.viewers, seconds=args.seconds, prompt_after=args.prompt_after, steps=args.steps,
                      fps=args.fps, window=args.window, buffer_seconds=args.buffer, stamp=not args.no_stamp,
                      browser=args.browser, scaling=args.scaling, viewers_sweep=args.viewers_sweep,
                      sweep_seconds=args.sweep_seconds, scaling_sections=args.scaling_sections)
    plot_path = args.plot or (str(Path(args.json).with_suffix(".png")) if args.json else None)
    for path in filter(None, (args.json, plot_path)):
        if not Path(path).resolve().parent.is_dir():
            raise ValueError(f"{path}: folder {Path(path).resolve().parent} does not exist")
    pipe, warmup = (None, 0.0) if cfg.url else load_warm_pipeline(cfg)
    result, run, extras = asyncio.run(bench(cfg, pipe))
    if plot_path:
        report.plot(run, result, plot_path)
    result["config"]["warmup_s"] = round(warmup, 2)
    result["config"]["wall_s"] = round(time.monotonic() - began, 1)
    print(report.table(result, extras))
    print(f"wall time {result['config']['wall_s']:.1f} s (model load + warm-up {warmup:.1f} s)")
    if args.json:
        report.write_json(result, args.json)
        print(f"wrote {args.json}" + (f" and {plot_path}" if plot_path else ""))
    elif plot_path:
        print(f"wrote {plot_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/latency.py", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_cli(parser.parse_args(argv))
