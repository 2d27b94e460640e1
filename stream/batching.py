"""The device worker with continuous batching (``serve --batching on``, the default).

Where :class:`~framepack_rt.stream.generation.DeviceWorker` gives the device to one session's whole section
at a time, :class:`BatchingWorker` advances the open sections of every ready session by one sampling step per
round, as one packed forward (framepack_rt/pipeline/batching.py; at most ``max_batch`` sections a forward).
Between rounds sessions join (ready: running, watched, with buffer room for a whole section) and leave
(removed, stopped, finished, failed); a section once started is finished even if its session pauses meanwhile,
as the round-robin worker does. Sections that finish in the same round are decoded in one VAE batch, on a decode
thread, while the worker samples the next steps (the pipeline's decode overlap, for many sessions: a session may
sample its next section while its last one decodes). Every open section gets one step per round, so sessions at
equal settings generate at equal rates.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

from framepack_rt.pipeline.batching import StreamBatch, decode_together
from framepack_rt.stream.generation import Generation, WorkerThread


class BatchingWorker(WorkerThread):
    """The generation thread of one device: every ready session's sections, stepped together."""

    def __init__(self, device: str = "cpu", max_batch: int = 8) -> None:
        if max_batch < 1:
            raise ValueError(f"--max-batch must be >= 1, got {max_batch}")
        super().__init__(device)
        self.max_batch = max_batch
        self._decoding: dict[Generation, int] = {}  # sessions -> their sections sampled and still decoding
        self._in_flight: Future | None = None  # the decode batch on the decode thread
        self.rounds = 0  # steps of all open sections taken so far (for tests and stats)
        self._thread.start()

    # -- worker thread ------------------------------------------------------------------------------------------
    def _run(self) -> None:
        batch = StreamBatch(self.max_batch)
        open_: dict[Generation, float] = {}  # sessions with a section open -> when it began (monotonic)
        decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"framepack-decode-{self.device}")
        try:
            while True:
                with self._cond:
                    while not self._closed and not open_ and not any(self._may_open(job) for job in self._jobs):
                        self._cond.wait(0.5)  # a safety net only: every state change calls wake()
                    if self._closed:
                        return
                    jobs = list(self._jobs)
                self._leave(batch, open_, jobs)
                self._join(batch, open_, jobs)
                if open_:
                    self._step(batch, open_, decoder)
        finally:
            for job in list(open_):
                batch.leave(job.stream)
                job.sampling = False
            decoder.shutdown(wait=True)

    def _may_open(self, job: Generation) -> bool:
        """Ready for a new section, counting the frames of its section still decoding as taken buffer room (so
        the decode thread never waits on a full buffer)."""
        decoding = self._decoding.get(job, 0)
        if not job.ready():
            return False
        return decoding == 0 or job.buffer.free >= (decoding + 1) * job.section_frames

    @staticmethod
    def _leave(batch: StreamBatch, open_: dict[Generation, float], jobs: list[Generation]) -> None:
        for job in list(open_):
            if job not in jobs or job.done or job.buffer.closed:
                batch.leave(job.stream)
                del open_[job]
                job.sampling = False

    def _join(self, batch: StreamBatch, open_: dict[Generation, float], jobs: list[Generation]) -> None:
        for job in jobs:
            if job in open_ or not self._may_open(job):
                continue
            stream = job.stream
            if not hasattr(stream, "open_run"):  # not a pipeline VideoStream (a test source): a whole section
                job.run_section()
                continue

            def join() -> None:
                if not batch.join(stream):
                    raise StopIteration

            job.guarded(join)
            if stream in batch.active:
                open_[job] = time.monotonic()
                job.sampling = True

    def _step(self, batch: StreamBatch, open_: dict[Generation, float], decoder: ThreadPoolExecutor) -> None:
        jobs = {job.stream: job for job in open_}
        failed, finished = batch.advance()
        self.rounds += 1
        for stream, exc in failed:
            job = jobs[stream]
            open_.pop(job)
            job.sampling = False

            def fail(exc: BaseException = exc) -> None:
                raise exc

            job.guarded(fail)
        if finished:
            done = [(jobs[stream], open_.pop(jobs[stream])) for stream, _ in finished]
            for job, _ in done:  # busy until the decode thread has handed the section over
                job.hold()
                job.sampling = False
            if self._in_flight is not None:
                # One decode batch at a time: every session waits for it alike (fair), and none has two
                # sections decoding (so its buffer room is counted right).
                self._in_flight.result()
            with self._cond:
                for job, _ in done:
                    self._decoding[job] = self._decoding.get(job, 0) + 1
            self._in_flight = decoder.submit(self._decode, finished, done)

    def _decode(self, finished: list, done: list[tuple[Generation, float]]) -> None:
        """Decode thread: the sections that finished in one round, in one VAE batch, handed to their sessions
        (while the worker thread samples the next steps: decode and sampling each use the cores the other
        leaves idle). Never raises."""
        try:
            outcomes = decode_together(finished)
        except Exception as exc:  # noqa: BLE001 -- the VAE failed: the sessions of this batch end with it
            outcomes = [(stream, exc) for stream, _ in finished]
        for (job, began), (_, outcome) in zip(done, outcomes):
            try:
                if isinstance(outcome, BaseException):
                    def fail(exc: BaseException = outcome) -> None:
                        raise exc

                    job.guarded(fail)
                else:
                    job.guarded(lambda: job.push_section(outcome, began))
            finally:
                job.release()  # the hold taken when its sampling finished
            with self._cond:
                self._decoding[job] -= 1
                if not self._decoding[job]:
                    del self._decoding[job]
                self._cond.notify_all()
