"""The one dispatch point for attention, chosen by measurement.

Every attention call in the model runs on packed (varlen) sequences in the flash-attn layout: q, k, v are
(total_tokens, heads, head_dim) and ``cu_seqlens`` (int32, batch + 1) marks where each sample's sequence
starts. No work is spent on padding because there is none.

:func:`attention_for` decides the backend once per (device, dtype, head_dim, length bucket) and returns an
:class:`AttentionChoice` whose ``fn`` the model then calls directly. The decision, in order:
  1. ``FRAMEPACK_ATTENTION=<backend>`` forces one (an error says why when it cannot run here, or when it fails
     the correctness probe);
  2. the kernels' switch (``framepack_rt.kernels.use_kernels`` / ``FRAMEPACK_KERNELS``): forced on gives the
     project's Triton kernel on any device (the CPU runs it under Triton's interpreter) unless it fails its
     self-check; forced off removes it from the candidates;
  3. anything but CUDA, and fp32 everywhere: ``sdpa``, exact torch SDPA segment by segment;
  4. CUDA, fp16/bf16: every candidate that can run is probed for correctness on a small ragged batch (the
     project's tolerance rule, :mod:`framepack_rt.kernels.selfcheck`), those that pass are timed at the first
     call's length, and the fastest is kept. Candidates: flash-attn 3 and 2 varlen when installed, torch SDPA
     restricted to its cuDNN, flash and memory-efficient backends, SageAttention when installed and allowed
     (approximate, so opt-in: ``FRAMEPACK_ALLOW_APPROX_ATTENTION=1`` or ``allow_approx=True``), the Triton
     kernel, and plain SDPA.
The choice, every candidate's result and the measured TFLOP/s are logged (INFO, this module's logger) and
kept: :func:`attention_choices`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import os
import statistics
import threading
import warnings
from typing import Callable, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from framepack_rt.kernels import selfcheck
from framepack_rt.kernels.dispatch import kernels_forced, triton_available, wants_kernels

LOGGER = logging.getLogger(__name__)
ENV_VAR = "FRAMEPACK_ATTENTION"
APPROX_ENV_VAR = "FRAMEPACK_ALLOW_APPROX_ATTENTION"
BACKENDS = ("flash_attn3", "flash_attn", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sage", "triton", "sdpa")
APPROX_REL_L1 = 0.05  # an approximate backend's bound: mean |out - exact| / mean |exact| on the probe
TIMING_HEADS = 24  # heads of the timing problem (the 13B's); the length is the first call's max_seqlen
PROBE_LENGTHS = (5, 70)  # the correctness probe: ragged, a segment shorter than any tile
PROBE_HEADS = 2


class AttentionFn(Protocol):
    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
        seqlens: list[int], scale: float | None = None,
    ) -> torch.Tensor: ...


Timer = Callable[[Callable[[], object]], float]  # timer(fn) -> milliseconds per call of fn


# -- the backends --------------------------------------------------------------------------------------------
def sdpa_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqlens: list[int], scale: float | None = None
) -> torch.Tensor:
    """Exact reference: dense SDPA on each segment. Equal-length segments run as one batched call."""
    if len(set(seqlens)) == 1:
        n, length = len(seqlens), seqlens[0]
        # (total, H, D) -> (n, H, L, D)
        qb, kb, vb = (t.unflatten(0, (n, length)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(qb, kb, vb, scale=scale)
        return out.transpose(1, 2).flatten(0, 1)
    out = torch.empty_like(q)
    start = 0
    for length in seqlens:
        end = start + length
        seg = [t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v)]
        out[start:end] = F.scaled_dot_product_attention(*seg, scale=scale)[0].transpose(0, 1)
        start = end
    return out


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqlens: Sequence[int], scale: float | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Softmax attention written out (matmul, softmax, matmul) per segment in ``compute_dtype``: fp32 is the
    exact reference, a 16-bit dtype what plain torch gets in that precision. Returns ``compute_dtype``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    outs, start = [], 0
    for length in seqlens:
        qs, ks, vs = (t[start : start + length].transpose(0, 1).to(compute_dtype) for t in (q, k, v))
        weights = torch.softmax((qs @ ks.transpose(-1, -2)) * scale, dim=-1)
        outs.append((weights @ vs).transpose(0, 1))
        start += length
    return torch.cat(outs)


@functools.lru_cache(maxsize=None)
def _optional(module: str, attr: str) -> Callable | None:
    """``module.attr`` when the package imports, else None: a CUDA extension built for another torch or CUDA
    (an ImportError, OSError or RuntimeError at import) counts as missing."""
    try:
        return getattr(importlib.import_module(module), attr, None)
    except (ImportError, OSError, RuntimeError):
        return None


def _run_sdpa(q, k, v, cu_seqlens, max_seqlen, seqlens, scale=None):
    return sdpa_varlen(q, k, v, seqlens, scale=scale)


def _sdpa_backend(backend: SDPBackend) -> AttentionFn:
    """SDPA restricted to one of torch's backends (it raises when that backend cannot take the call)."""

    def run(q, k, v, cu_seqlens, max_seqlen, seqlens, scale=None):
        with sdpa_kernel(backend):
            return sdpa_varlen(q, k, v, seqlens, scale=scale)

    run.__name__ = f"sdpa_{backend.name.lower()}"
    return run


def _flash_attn_varlen(fn: Callable) -> AttentionFn:
    """flash-attn 2 (``flash_attn``) or 3 (``flash_attn_interface``) varlen; FA3 may return (out, lse)."""

    def run(q, k, v, cu_seqlens, max_seqlen, seqlens, scale=None):
        out = fn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale=scale, causal=False)
        return out[0] if isinstance(out, tuple) else out

    return run


def _sage_varlen(fn: Callable) -> AttentionFn:
    def run(q, k, v, cu_seqlens, max_seqlen, seqlens, scale=None):
        return fn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, is_causal=False, sm_scale=scale)

    return run


def _run_triton(q, k, v, cu_seqlens, max_seqlen, seqlens, scale=None):
    from framepack_rt.kernels.packed_attention import packed_attention as triton_packed_attention

    return triton_packed_attention(q, k, v, cu_seqlens, max_seqlen, scale=scale)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A backend as the selection sees it."""

    name: str
    fn: AttentionFn | None  # None: cannot run here, ``missing`` says why
    missing: str = ""
    approximate: bool = False
    kernel: str | None = None  # a project kernel: its correctness is its self-check (selfcheck.check_kernel)


def default_candidates(device: torch.device, kernels: bool | None) -> list[Candidate]:
    """Every backend in :data:`BACKENDS` order, each runnable on ``device`` or saying why not."""
    cuda = device.type == "cuda"
    no_cuda = "needs CUDA"

    def optional(name: str, module: str, attr: str, wrap: Callable, install: str, **kw) -> Candidate:
        if not cuda:
            return Candidate(name, None, no_cuda, **kw)
        fn = _optional(module, attr)
        return Candidate(name, wrap(fn), **kw) if fn is not None else Candidate(name, None, install, **kw)

    cudnn = getattr(SDPBackend, "CUDNN_ATTENTION", None)  # torch >= 2.4
    if not triton_available():
        triton = Candidate("triton", None, "triton is not installed", kernel="packed_attention")
    elif not cuda and not kernels:
        triton = Candidate("triton", None, "needs CUDA, or the kernels forced on under TRITON_INTERPRET=1",
                           kernel="packed_attention")
    else:
        triton = Candidate("triton", _run_triton, kernel="packed_attention")
    return [
        optional("flash_attn3", "flash_attn_interface", "flash_attn_varlen_func", _flash_attn_varlen,
                 "flash-attn 3 (flash_attn_interface) is not installed"),
        optional("flash_attn", "flash_attn", "flash_attn_varlen_func", _flash_attn_varlen,
                 "flash-attn is not installed (pip install framepack-rt[flash])"),
        Candidate("sdpa_cudnn", _sdpa_backend(cudnn)) if cuda and cudnn is not None
        else Candidate("sdpa_cudnn", None, no_cuda if not cuda else "this torch has no cuDNN attention"),
        Candidate("sdpa_flash", _sdpa_backend(SDPBackend.FLASH_ATTENTION)) if cuda
        else Candidate("sdpa_flash", None, no_cuda),
        Candidate("sdpa_efficient", _sdpa_backend(SDPBackend.EFFICIENT_ATTENTION)) if cuda
        else Candidate("sdpa_efficient", None, no_cuda),
        optional("sage", "sageattention", "sageattn_varlen", _sage_varlen, "sageattention is not installed",
                 approximate=True),
        triton,
        Candidate("sdpa", _run_sdpa),
    ]


# -- results -------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CandidateResult:
    """What the selection found out about one candidate."""

    name: str
    ok: bool  # passed the correctness probe (and timed, where timing ran)
    reason: str = ""
    ms: float | None = None  # per call at the timing problem
    tflops: float | None = None
    error: float | None = None  # max |out - fp32 reference| (approximate backends: relative L1)
    tolerance: float | None = None


@dataclasses.dataclass(frozen=True)
class AttentionChoice:
    """The attention backend decided for one (device, dtype, head_dim, length bucket), and why."""

    name: str
    fn: AttentionFn  # fn(q, k, v, cu_seqlens, max_seqlen, seqlens, scale): packed_attention's contract
    tflops: float | None = None  # measured throughput where it was timed
    reason: str = ""
    candidates: tuple[CandidateResult, ...] = ()  # every candidate's result, when there was a selection
    device: str = ""
    dtype: torch.dtype | None = None
    head_dim: int = 0
    length_bucket: int = 0
    timed_length: int | None = None  # the sequence length the timings are for

    def summary(self) -> str:
        """One line: the choice, its throughput and why; then every candidate."""
        dtype = str(self.dtype).replace("torch.", "")
        head = f"attention {self.device} {dtype} head_dim {self.head_dim} len<={self.length_bucket}: {self.name}"
        if self.tflops is not None:
            head += f" {self.tflops:.1f} TFLOP/s at {self.timed_length} tokens x {TIMING_HEADS} heads"
        parts = [f"{head} ({self.reason})"]
        for c in self.candidates:
            if c.ms is not None:
                parts.append(f"{c.name} {c.ms:.3f} ms {c.tflops:.1f} TFLOP/s")
            else:
                parts.append(f"{c.name}: {c.reason}")
        return "; ".join(parts)


def length_bucket(max_seqlen: int) -> int:
    """Decisions are kept per power-of-two length class (at least 16)."""
    return max(16, 1 << max(0, int(max_seqlen) - 1).bit_length())


def attention_flops(seqlens: Sequence[int], heads: int, head_dim: int) -> int:
    """Forward FLOPs: two (L x L x D) matmuls per segment and head, 2 FLOPs per multiply-add."""
    return sum(4 * n * n * heads * head_dim for n in seqlens)


def cuda_event_times(fn: Callable[[], object], warmup: int, iters: int) -> list[float]:
    """Milliseconds of each of ``iters`` calls from CUDA events, after ``warmup`` untimed calls (autotuning
    runs there). Also the kernel benchmarks' timer (kernels/bench.py)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def cuda_timer(fn: Callable[[], object], warmup: int = 2, iters: int = 5) -> float:
    """Median milliseconds per call (see :func:`cuda_event_times`)."""
    return statistics.median(cuda_event_times(fn, warmup, iters))


@dataclasses.dataclass(frozen=True)
class _ProbeProblem:
    inputs: tuple  # q, k, v, cu_seqlens, lengths
    exact: torch.Tensor  # the fp32 reference
    tolerance: float  # the project's rule: 2 x torch's own error in this dtype + atol (fp32: atol)


def probe_problem(device: torch.device, dtype: torch.dtype, head_dim: int) -> _ProbeProblem:
    """The correctness probe's inputs, fp32 reference and tolerance."""
    g = torch.Generator().manual_seed(4)
    lengths = list(PROBE_LENGTHS)
    q, k, v = (torch.randn(sum(lengths), PROBE_HEADS, head_dim, generator=g).to(device, dtype) for _ in range(3))
    cu = torch.tensor([0, lengths[0], sum(lengths)], dtype=torch.int32, device=device)
    exact = reference_attention(q, k, v, lengths)
    torch_err = None
    if dtype != torch.float32:
        torch_err = selfcheck.max_error(reference_attention(q, k, v, lengths, compute_dtype=dtype), exact)
    bound = selfcheck.tolerance(torch_err, selfcheck.reference_scale(exact))
    return _ProbeProblem((q, k, v, cu, lengths), exact, bound)


# -- the selection -------------------------------------------------------------------------------------------
class AttentionSelector:
    """Decides attention once per (device, dtype, head_dim, length bucket, switches) and remembers it.

    ``candidates(device, kernels)`` lists the backends (default :func:`default_candidates`); ``timer`` times one
    (default :func:`cuda_timer`); measurement runs on the device types in ``measured`` (default CUDA only)."""

    def __init__(
        self,
        candidates: Callable[[torch.device, bool | None], list[Candidate]] = default_candidates,
        timer: Timer = cuda_timer,
        measured: tuple[str, ...] = ("cuda",),
        timing_heads: int = TIMING_HEADS,
    ) -> None:
        self._candidates, self._timer, self._measured, self._heads = candidates, timer, measured, timing_heads
        self._choices: dict[tuple, AttentionChoice] = {}
        self._probes: dict[tuple, _ProbeProblem] = {}  # one probe problem per (device, dtype, head_dim)
        self._lock = threading.Lock()

    def choose(
        self, device: torch.device, dtype: torch.dtype, head_dim: int, max_seqlen: int,
        allow_approx: bool | None = None,
    ) -> AttentionChoice:
        device = torch.device(device)
        forced = os.environ.get(ENV_VAR, "").strip()
        kernels = kernels_forced()
        if allow_approx is None:
            allow_approx = os.environ.get(APPROX_ENV_VAR, "").strip() == "1"
        key = (selfcheck.device_key(device), dtype, head_dim, length_bucket(max_seqlen), forced, kernels, allow_approx)
        with self._lock:  # one measurement per key, also when two threads ask at once
            choice = self._choices.get(key)
            if choice is None:
                choice = self._decide(torch.device(key[0]), dtype, head_dim, max_seqlen, forced, kernels, allow_approx)
                choice = dataclasses.replace(
                    choice, device=key[0], dtype=dtype, head_dim=head_dim, length_bucket=key[3]
                )
                self._choices[key] = choice
                LOGGER.info("%s", choice.summary())
            return choice

    def choices(self) -> list[AttentionChoice]:
        with self._lock:
            return list(self._choices.values())

    def clear(self) -> None:
        with self._lock:
            self._choices.clear()
            self._probes.clear()

    # -- the rules ---------------------------------------------------------------------------------------------
    def _decide(self, device, dtype, head_dim, max_seqlen, forced, kernels, allow_approx) -> AttentionChoice:
        candidates = self._candidates(device, kernels)
        by_name = {c.name: c for c in candidates}
        measured = device.type in self._measured
        if forced:
            return self._forced(by_name, forced, device, dtype, head_dim, max_seqlen, measured)
        if kernels:
            wants_kernels(torch.empty(0, device=device))  # raises with the reason when the kernel cannot run here
            triton = by_name["triton"]
            result = self._probe(triton, device, dtype, head_dim)
            if result.ok:
                return self._single(triton, device, dtype, head_dim, max_seqlen, measured,
                                    "kernels forced on (use_kernels / FRAMEPACK_KERNELS=1)")
            return AttentionChoice("sdpa", by_name["sdpa"].fn, None,
                                   f"kernels forced on, but the Triton kernel failed its self-check: {result.reason}")
        if not measured:
            return AttentionChoice("sdpa", by_name["sdpa"].fn, None, f"no measurement on {device.type}: exact SDPA")
        if dtype == torch.float32:
            return AttentionChoice("sdpa", by_name["sdpa"].fn, None, "fp32: exact SDPA (fused backends are 16-bit)")
        return self._measure(candidates, device, dtype, head_dim, max_seqlen, kernels, allow_approx)

    def _forced(self, by_name, forced, device, dtype, head_dim, max_seqlen, measured) -> AttentionChoice:
        if forced not in by_name:
            raise ValueError(f"{ENV_VAR}={forced!r}: choose one of {', '.join(by_name)}, or unset it")
        candidate = by_name[forced]
        if candidate.fn is None:
            usable = [c.name for c in by_name.values() if c.fn is not None]
            raise RuntimeError(
                f"{ENV_VAR}={forced!r} cannot run on {device} ({candidate.missing}): usable here are {usable}"
            )
        if forced != "sdpa":
            result = self._probe(candidate, device, dtype, head_dim)
            if not result.ok:
                raise RuntimeError(
                    f"{ENV_VAR}={forced!r} failed its correctness probe on {device} {dtype}: {result.reason}; "
                    f"unset {ENV_VAR} to let the model choose a backend that passes"
                )
        return self._single(candidate, device, dtype, head_dim, max_seqlen, measured, f"forced by {ENV_VAR}")

    def _single(self, candidate, device, dtype, head_dim, max_seqlen, measured, reason) -> AttentionChoice:
        """A backend decided by rule; timed for the report where timing runs."""
        if not (measured and dtype != torch.float32):
            return AttentionChoice(candidate.name, candidate.fn, None, reason)
        timed = self._time(candidate, device, dtype, head_dim, max_seqlen)
        return AttentionChoice(candidate.name, candidate.fn, timed.tflops, reason, (timed,), timed_length=max_seqlen)

    def _measure(self, candidates, device, dtype, head_dim, max_seqlen, kernels, allow_approx) -> AttentionChoice:
        results: list[CandidateResult] = []
        for candidate in candidates:
            if candidate.fn is None:
                results.append(CandidateResult(candidate.name, False, candidate.missing))
            elif candidate.name == "triton" and kernels is False:
                results.append(CandidateResult(candidate.name, False, "kernels forced off"))
            elif candidate.approximate and not allow_approx:
                results.append(CandidateResult(candidate.name, False, f"approximate: {APPROX_ENV_VAR}=1 allows it"))
            else:
                probe = self._probe(candidate, device, dtype, head_dim)
                results.append(self._time(candidate, device, dtype, head_dim, max_seqlen) if probe.ok else probe)
        timed = [r for r in results if r.ok]
        if not timed:  # cannot happen while plain SDPA passes its own probe; kept exact if it ever does
            sdpa = next(c for c in candidates if c.name == "sdpa")
            return AttentionChoice("sdpa", sdpa.fn, None, "no candidate passed: exact SDPA", tuple(results),
                                   timed_length=max_seqlen)
        best = min(timed, key=lambda r: r.ms)
        fn = next(c.fn for c in candidates if c.name == best.name)
        return AttentionChoice(best.name, fn, best.tflops, f"fastest of {len(timed)} that passed the probe",
                               tuple(results), timed_length=max_seqlen)

    def _probe(self, candidate: Candidate, device, dtype, head_dim) -> CandidateResult:
        """Correctness on a small ragged batch against the fp32 reference (project kernels: their self-check)."""
        if candidate.kernel is not None:
            check = selfcheck.check_kernel(candidate.kernel, device, dtype, (head_dim,))
            return CandidateResult(candidate.name, check.ok, check.reason, error=check.max_error,
                                   tolerance=check.tolerance)
        key = (str(device), dtype, head_dim)
        probe = self._probes.get(key)
        if probe is None:
            probe = self._probes[key] = probe_problem(device, dtype, head_dim)
        q, k, v, cu, lengths = probe.inputs
        lengths = list(lengths)
        try:
            with warnings.catch_warnings():  # torch warns why a restricted SDPA backend cannot run: we report it
                warnings.simplefilter("ignore")
                out = candidate.fn(q, k, v, cu, max(lengths), lengths, None)
        except Exception as error:  # noqa: BLE001 - a backend that cannot take the call is reported, not used
            lines = str(error).strip().splitlines()
            return CandidateResult(candidate.name, False, f"{type(error).__name__}: {lines[0] if lines else ''}"[:300])
        if out.shape != q.shape:
            return CandidateResult(candidate.name, False, f"output shape {tuple(out.shape)}, expected {tuple(q.shape)}")
        if candidate.approximate:
            err = ((out.float() - probe.exact).abs().mean() / probe.exact.abs().mean()).item()
            bound, what = APPROX_REL_L1, "relative L1 error"
        else:
            err, bound, what = selfcheck.max_error(out, probe.exact), probe.tolerance, "max error"
        if not err <= bound:  # NaN fails too
            return CandidateResult(candidate.name, False, f"{what} {err:.3g} > tolerance {bound:.3g}", error=err,
                                   tolerance=bound)
        return CandidateResult(candidate.name, True, "passed", error=err, tolerance=bound)

    def _time(self, candidate: Candidate, device, dtype, head_dim, max_seqlen) -> CandidateResult:
        length = max(1, int(max_seqlen))
        g = torch.Generator(device=device).manual_seed(5) if device.type == "cuda" else None
        q, k, v = (torch.randn(length, self._heads, head_dim, generator=g, device=device, dtype=dtype)
                   for _ in range(3))
        cu = torch.tensor([0, length], dtype=torch.int32, device=device)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ms = self._timer(lambda: candidate.fn(q, k, v, cu, length, [length], None))
        except Exception as error:  # noqa: BLE001 - e.g. out of memory at this length: not a candidate here
            lines = str(error).strip().splitlines()
            return CandidateResult(candidate.name, False, f"timing failed: {type(error).__name__}: "
                                   f"{lines[0] if lines else ''}"[:300])
        flops = attention_flops([length], self._heads, head_dim)
        return CandidateResult(candidate.name, True, "passed", ms, flops / (ms * 1e-3) / 1e12 if ms > 0 else None)


SELECTOR = AttentionSelector()


def attention_for(
    device: torch.device, dtype: torch.dtype, head_dim: int, max_seqlen: int, *, allow_approx: bool | None = None
) -> AttentionChoice:
    """The backend for q/k/v of ``dtype`` on ``device`` with ``head_dim`` and segments up to ``max_seqlen``:
    decided on the first call for its (device, dtype, head_dim, length bucket, switches), then the same object.
    Call ``choice.fn`` directly: it reads no environment or ContextVar and syncs nothing.
    ``allow_approx`` (default: ``FRAMEPACK_ALLOW_APPROX_ATTENTION=1``) lets SageAttention compete."""
    return SELECTOR.choose(device, dtype, head_dim, max_seqlen, allow_approx)


def attention_choices() -> list[AttentionChoice]:
    """Every decision made so far in this process (for reports: ``choice.summary()``)."""
    return SELECTOR.choices()


def available_backends(device: torch.device) -> list[str]:
    """Backends that can run on ``device`` with the kernels' switch as it is now, in :data:`BACKENDS` order."""
    return [c.name for c in default_candidates(torch.device(device), kernels_forced()) if c.fn is not None]


def select_backend(q: torch.Tensor, max_seqlen: int | None = None) -> str:
    """The backend :func:`attention_for` gives q's device, dtype and head_dim (max_seqlen default: all of q)."""
    return attention_for(q.device, q.dtype, q.shape[-1], q.shape[0] if max_seqlen is None else max_seqlen).name


def packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    seqlens: list[int],
    scale: float | None = None,
) -> torch.Tensor:
    """Non-causal attention over packed sequences, through :func:`attention_for` (decided once, then cached).

    Args:
        q, k, v: (total_tokens, heads, head_dim), same dtype and device.
        cu_seqlens: int32 (batch + 1,) cumulative lengths, on q's device (flash-attn convention).
        max_seqlen: the longest segment.
        seqlens: the segment lengths as Python ints (the host copy of ``cu_seqlens.diff()``, so that no
            backend needs a device sync to read them).
        scale: softmax scale, default head_dim ** -0.5.
    Returns:
        (total_tokens, heads, head_dim) in q's dtype.
    """
    return attention_for(q.device, q.dtype, q.shape[-1], max_seqlen).fn(q, k, v, cu_seqlens, max_seqlen, seqlens, scale)
