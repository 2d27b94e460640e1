"""The VAE decode of section k beside the sampling of section k + 1: one decode thread per stream.

    ahead = DecodeAhead(decode, device)      # decode(item) -> result, run on the decode thread
    ahead.submit(latents_k, latents_k.output_latents)   # the decode of k starts
    ...                                      # the caller samples k + 1 meanwhile
    section_k = ahead.take()                 # waits for k's result (re-raises its exception)
    ahead.close()                            # the thread ends after the job it holds

At most one job is held (``submit`` refuses a second before ``take``): one section decoded ahead, no more
memory. The thread is not a daemon, so a decode in progress finishes before the interpreter exits, and it ends
by itself after IDLE_EXIT_S without work, so a stream dropped without stop() holds no thread. On the CPU the
decode runs on its own thread (torch releases the GIL inside its kernels, so the two overlap); on CUDA that thread decodes on its own CUDA stream, which waits for an event recorded on the
sampler's stream at ``submit``, and the latents are marked as used by that stream (``record_stream``) so the
caching allocator cannot hand their memory to the sampler before the decode is done. Results are what the
decode function returns on the caller's thread: the order and content of sections do not change (tested bit
for bit in tests/pipeline/test_decode_ahead.py).

:func:`overlap_by_default` is the default the pipeline takes (``--no-decode-overlap`` turns it off).
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import Future
from typing import Callable, Generic, TypeVar

import torch

Item = TypeVar("Item")
Result = TypeVar("Result")
IDLE_EXIT_S = 2.0  # the decode thread ends after this long without a job (the next submit starts another)


def overlap_by_default(device: torch.device, low_vram: bool) -> bool:
    """Overlap unless low-VRAM mode: there the decode's tiles would sit in memory beside a sampling step's
    activations, which is the peak that mode exists to lower. On the CPU too: benchmarks/decode_overlap.py
    measured it as fast or faster in median (1.01-1.07x on 2 cores at low load; far faster while other
    processes held the cores) with identical frames (README). The GPU path is not measured yet."""
    return not low_vram


class DecodeAhead(Generic[Item, Result]):
    """Runs ``decode(item)`` on its own thread (and CUDA stream), one job at a time; see the module docstring."""

    def __init__(self, decode: Callable[[Item], Result], device: torch.device | str,
                 name: str = "framepack-decode") -> None:
        self._decode = decode
        self.device = torch.device(device)
        self._name = name
        self._cond = threading.Condition()
        self._job: tuple[Item, object, Future] | None = None  # (item, CUDA event or None, its future)
        self._closed = False
        self._thread: threading.Thread | None = None
        self._side_stream = None  # CUDA only, made at the first submit
        self._pending: Future | None = None  # the caller's side: the job submitted and not yet taken

    @property
    def pending(self) -> bool:
        """A job was submitted and its result not yet taken (the caller's thread)."""
        return self._pending is not None

    @property
    def alive(self) -> bool:
        """The decode thread is running (started by a submit, ended by close or after IDLE_EXIT_S idle)."""
        return self._thread is not None and self._thread.is_alive()

    def submit(self, item: Item, *tensors: torch.Tensor) -> None:
        """Start decoding ``item``. ``tensors``: the device tensors the decode reads (on CUDA they are ordered
        after the work queued so far on the current stream). After close() nothing runs: the stream was stopped
        and nobody will take the result."""
        if self._pending is not None:
            raise RuntimeError("one section is decoded ahead at most: take() the previous result first")
        ready = None
        if self.device.type == "cuda":
            with self._cond:
                if self._side_stream is None:
                    self._side_stream = torch.cuda.Stream(self.device)
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
            for tensor in tensors:
                if tensor.device.type == "cuda":
                    tensor.record_stream(self._side_stream)
        future: Future = Future()
        with self._cond:
            if self._closed:
                return
            self._job = (item, ready, future)
            self._cond.notify()
            self._start_locked()
        self._pending = future

    def take(self) -> Result:
        """The submitted job's result, once done; its exception is raised here."""
        if self._pending is None:
            raise RuntimeError("nothing was submitted")
        future, self._pending = self._pending, None
        return future.result()

    def close(self) -> None:
        """End the thread after the job it holds (thread-safe; later submits run nothing)."""
        with self._cond:
            self._closed = True
            self._cond.notify()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the decode thread to end (after close(), or idle); True if none runs."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return not self.alive

    def _start_locked(self) -> None:
        if self._thread is None and not self._closed:
            self._thread = threading.Thread(target=self._run, name=self._name)
            self._thread.start()

    def _run(self) -> None:
        stream = self._side_stream
        with torch.no_grad(), (torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()):
            while True:
                with self._cond:
                    if self._job is None and not self._closed:
                        self._cond.wait(IDLE_EXIT_S)
                    if self._job is None:  # closed, or idle for IDLE_EXIT_S: a later submit starts another
                        self._thread = None
                        return
                    (item, ready, future), self._job = self._job, None
                try:
                    if ready is not None:
                        stream.wait_event(ready)
                    future.set_result(self._decode(item))
                except Exception as exc:  # noqa: BLE001 -- handed to the caller, raised by take()
                    future.set_exception(exc)

