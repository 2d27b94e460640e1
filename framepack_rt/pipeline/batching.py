"""Several VideoStreams generated together: their sections' steps as packed forwards (engine/batching.py),
the sections that finish together decoded in one VAE batch.

    batch = StreamBatch(max_batch=8)
    batch.join(stream_a); batch.join(stream_b)          # each opens its next section
    while batch.active:
        for stream, outcome in batch.step():            # one step of every open section
            ...                                         # a Section, or an exception (stopped, failed)

Batched decode: a StreamingDecoder decides which temporal tiles a push decodes from latent counts alone, never
from decoded pixels. So each stream's push is first played on a copy of its decoder whose VAE only records the
tiles asked for; the recorded tiles of all streams are decoded in batches (same shape, up to DECODE_BATCH);
then the real push runs with a VAE that hands out those decodes in order. Frames equal a solo decode up to
float rounding. Measured on the demo VAE (64x64 frames, fp32, the 2-core CPU): with torch's 2 threads a tile
took 277 ms alone, 207 ms in a batch of 2 and 195 ms in a batch of 4 (wall, load 0.1), and a batch of 8 was
slower than 8 single tiles, so batches stop at 4. With 1 thread every batch size costs the same CPU time per
tile (250-260 ms): batching helps the VAE only by using both cores better.
"""

from __future__ import annotations

import copy
import time
from dataclasses import replace
from typing import Hashable

import torch

from framepack_rt.engine.batching import SectionRun, StepBatcher
from framepack_rt.pipeline.video_stream import Section, VideoStream, _Stopped
from framepack_rt.pipeline.vae import StreamingDecoder, frame_count

DECODE_BATCH = 4  # tiles per VAE batch (see the module docstring)


class StreamBatch:
    """The open sections of several streams, advanced together one step at a time."""

    def __init__(self, max_batch: int = 8) -> None:
        self.max_batch = max_batch
        self._runs: dict[VideoStream, SectionRun] = {}
        self._batchers: dict[int, StepBatcher] = {}  # by id(model): streams of one pipeline share one

    @property
    def active(self) -> list[VideoStream]:
        return list(self._runs)

    def join(self, stream: VideoStream) -> bool:
        """Open ``stream``'s next section (False: the stream has ended). Errors opening it propagate."""
        if stream in self._runs:
            return True
        run = stream.open_run()
        if run is None:
            return False
        self._runs[stream] = run
        return True

    def leave(self, stream: VideoStream) -> None:
        """Abandon ``stream``'s open section (the session went away)."""
        run = self._runs.pop(stream, None)
        if run is not None:
            run.close()
            stream.close_run(run.index)

    def step(self) -> list[tuple[VideoStream, Section | BaseException]]:
        """One step of every open section; returns the streams whose section ended, with its decoded Section, or
        the exception that ended it (StopIteration when the stream was stopped)."""
        failed, finished = self.advance()
        return failed + (decode_together(finished) if finished else [])

    def advance(self) -> tuple[list[tuple[VideoStream, BaseException]], list[tuple[VideoStream, SectionRun]]]:
        """:meth:`step` without the decode: (streams whose section failed, with why; streams whose section is
        sampled, with its run, for :func:`decode_together`, which may run on another thread)."""
        by_model: dict[int, list[tuple[VideoStream, SectionRun]]] = {}
        for stream, run in self._runs.items():
            by_model.setdefault(id(run.generator.model), []).append((stream, run))
        errors: dict[int, BaseException] = {}
        for key, members in by_model.items():
            batcher = self._batcher(key, *members[0])
            for run, exc in batcher.step([run for _, run in members]).failed:
                errors[id(run)] = StopIteration() if isinstance(exc, _Stopped) else exc
        failed, finished = [], []
        for stream, run in list(self._runs.items()):
            if id(run) in errors or run.done:
                del self._runs[stream]
                stream.close_run(run.index)
                if id(run) in errors:
                    failed.append((stream, errors[id(run)]))
                else:
                    finished.append((stream, run))
        return failed, finished

    def _batcher(self, key: int, stream: VideoStream, run: SectionRun) -> StepBatcher:
        batcher = self._batchers.get(key)
        if batcher is None:
            pipe = stream._pipe

            def apply_lora(scales: Hashable) -> None:
                """A group's LoRA scales (its batch key) onto the shared model before its forward."""
                if scales:
                    pipe.apply_lora_scales(dict(scales))

            batcher = self._batchers[key] = StepBatcher(run.generator.model, self.max_batch, before_forward=apply_lora)
        return batcher


def decode_together(finished: list[tuple[VideoStream, SectionRun]]) -> list[tuple[VideoStream, Section | BaseException]]:
    """Decode the finished sections of several streams, their VAE tiles batched; one outcome per stream."""
    began = time.perf_counter()
    recorded: list[tuple[VideoStream, SectionRun, list[torch.Tensor]]] = []
    for stream, run in finished:
        recorded.append((stream, run, _tiles_of_push(stream, run)))
    tiles = [z for _, _, zs in recorded for z in zs]
    tiled_vae = next((s._decoder.vae for s, _ in finished if isinstance(s._decoder, StreamingDecoder)), None)
    decoded = iter(_decode_tiles(tiled_vae, tiles)) if tiles else iter(())
    shared_ms = (time.perf_counter() - began) * 1000 / len(finished)
    outcomes: list[tuple[VideoStream, Section | BaseException]] = []
    for stream, run, zs in recorded:
        decoder = stream._decoder
        tiled = isinstance(decoder, StreamingDecoder)
        if tiled:
            real = decoder.vae
            decoder.vae = _ReplayVAE(real, [next(decoded) for _ in zs])
        try:
            section = stream._decode(run.result)
        except Exception as exc:  # noqa: BLE001 -- one stream's failure is its own outcome
            outcomes.append((stream, exc))
            continue
        finally:
            if tiled:
                decoder.vae = real
        decode_ms = section.decode_ms + shared_ms
        outcomes.append((stream, replace(section, decode_ms=decode_ms, ms=section.sample_ms + decode_ms)))
    return outcomes


def _tiles_of_push(stream: VideoStream, run: SectionRun) -> list[torch.Tensor]:
    """The VAE tiles ``stream``'s decode of this section asks for, found on a copy of its decoder; none when it
    decodes with a fast decoder (a few ms a section: decoded alone)."""
    if not isinstance(stream._decoder, StreamingDecoder):
        return []
    probe = copy.copy(stream._decoder)
    probe.latents_decoded = list(probe.latents_decoded)
    recorder = probe.vae = _RecordingVAE(stream._decoder.vae)
    probe.push(run.result.output_latents[0])
    if run.result.is_last:
        probe.finish()
    return recorder.tiles


def _decode_tiles(vae, tiles: list[torch.Tensor]) -> list[torch.Tensor]:
    """decode_tile of each tile, batched by shape, DECODE_BATCH at a time; in the tiles' order."""
    out: list[torch.Tensor | None] = [None] * len(tiles)
    by_shape: dict[Hashable, list[int]] = {}
    for i, z in enumerate(tiles):
        by_shape.setdefault(tuple(z.shape), []).append(i)
    for indices in by_shape.values():
        for start in range(0, len(indices), DECODE_BATCH):
            chunk = indices[start : start + DECODE_BATCH]
            pixels = vae.decode_tile(torch.cat([tiles[i] for i in chunk]))
            for i, p in zip(chunk, pixels.split(1)):
                out[i] = p
    return out


class _RecordingVAE:
    """A VideoVAE stand-in that records decode_tile's inputs and answers with zeros of the decoded shape."""

    def __init__(self, vae) -> None:
        self._vae, self.tiles = vae, []
        self.scaling_factor, self.live = vae.scaling_factor, vae.live
        self.device, self.dtype = vae.device, vae.dtype

    def decode_tile(self, z: torch.Tensor) -> torch.Tensor:
        self.tiles.append(z)
        r = self.live.spatial_compression_ratio
        return torch.zeros(z.shape[0], 3, frame_count(z.shape[2]), z.shape[3] * r, z.shape[4] * r,
                           dtype=z.dtype, device=z.device)


class _ReplayVAE:
    """A VideoVAE stand-in whose decode_tile hands out tiles decoded beforehand, in order."""

    def __init__(self, vae, decoded: list[torch.Tensor]) -> None:
        self._decoded = list(decoded)
        self.scaling_factor, self.live = vae.scaling_factor, vae.live
        self.device, self.dtype = vae.device, vae.dtype

    def decode_tile(self, z: torch.Tensor) -> torch.Tensor:
        if not self._decoded:
            raise RuntimeError("the decoder asked for more tiles than its dry run did: decode this section alone")
        return self._decoded.pop(0)
