"""Frame numbers stamped into the pixels, for glass-to-glass latency: a row of black/white blocks at the top.

The server (``ServerSettings(stamp=True)``, ``framepack-rt serve --stamp``) writes each generated frame's
number into the frame just before it is handed to the encoders and logs when (:class:`StampLog`); a viewer
reads the number back from the decoded picture (:func:`read_stamp_rgb`, :func:`read_stamp_luma`) and
compares its own clock with the logged send time. Same machine, same clock: ``time.monotonic()`` is
system-wide on Linux, so this also works across processes on one host.

The code: 16 cells, each a flat block of black or white, left to right (then on a next row if needed):
12 bits of the frame number (modulo 4096, most significant first) and a 4-bit CRC of them (XOR 1010, so a
uniform band is never a valid code). Why this shape:

* flat blocks aligned to the codecs' 4x4/8x8 transform grid survive VP8 and H.264 at low bitrates (a
  block's DC term is the last thing quantization destroys); the reader samples only each cell's central
  half, away from the deblocking filter's reach at the edges (cell sizes: :meth:`StampLayout.for_size`);
* 16 cells fit in one 8-pixel band at 64 pixels wide; 12 bits are unwrapped against the previous number a
  viewer read (:func:`unwrap`), exact while fewer than 2048 frames pass between reads;
* every cell must be clearly black or white and the CRC must match, so an unstamped picture (the start
  image shown before the first section) reads as None instead of a wrong number.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

DATA_BITS = 12
CHECK_BITS = 4
CELLS = DATA_BITS + CHECK_BITS
MODULUS = 1 << DATA_BITS
# A cell reads as a bit only if its mean is this far from mid-gray (of 0..255), i.e. within 55 of black or
# white: compression shifts levels by a few steps at most (measured), a photo's top rows are rarely this
# extreme in all 16 cells at once (the built-in scene's dark sky is not).
MARGIN = 72.0
# XORed into the check bits, so that an all-black or all-white band (a dark sky, a white wall) is no code.
CHECK_MASK = 0b1010
Y_BLACK, Y_WHITE = 16, 235  # I420 luma is limited range (BT.601): what rgb24 0 and 255 become


@dataclass(frozen=True)
class StampLayout:
    """Where the cells of a stamp go in a ``width`` x ``height`` frame: ``cell_w`` x ``cell_h`` blocks,
    row-major from the top left."""

    width: int
    height: int
    cell_w: int
    cell_h: int
    per_row: int
    rows: int

    @classmethod
    def for_size(cls, height: int, width: int) -> "StampLayout":
        """The layout both sides derive from the frame size alone (no side channel needed)."""
        # Small frames: 4x8 cells, all 16 in one 8-pixel band at 64 pixels wide. Measured: VP8 as aiortc
        # configures it (temporal denoiser on) sometimes keeps a stale 16x16 macroblock of 8x8 cells in
        # grainy video; narrower cells spread each macroblock over more bits and were read every time.
        # From 320 pixels wide: a 16x16 macroblock per cell, still a thin band (16 of 640 rows).
        cell_w, cell_h = (4, 8) if width < 320 else (16, 16)
        per_row = width // cell_w
        if per_row < 2:
            raise ValueError(f"a {width}x{height} frame is too small for a frame-number stamp")
        rows = -(-CELLS // per_row)
        if rows * cell_h > height // 2:
            raise ValueError(f"a {width}x{height} frame is too small for a frame-number stamp")
        return cls(width, height, cell_w, cell_h, per_row, rows)

    @property
    def band(self) -> int:
        """Rows of the frame the stamp covers."""
        return self.rows * self.cell_h

    def cells(self) -> list[tuple[int, int]]:
        """(top, left) of each cell, bit 0 (the most significant) first."""
        return [((i // self.per_row) * self.cell_h, (i % self.per_row) * self.cell_w) for i in range(CELLS)]

    def centers(self) -> list[tuple[int, int, int, int]]:
        """(top, left, height, width) of the central half of each cell: what a reader averages."""
        qh, qw = self.cell_h // 4, self.cell_w // 4
        return [(top + qh, left + qw, self.cell_h - 2 * qh, self.cell_w - 2 * qw) for top, left in self.cells()]


def crc4(value: int, bits: int = DATA_BITS) -> int:
    """CRC-4/ITU (x^4 + x + 1) of the low ``bits`` bits of ``value``, most significant bit first."""
    crc = 0
    for i in range(bits - 1, -1, -1):
        top = ((crc >> 3) & 1) ^ ((value >> i) & 1)
        crc = ((crc << 1) & 0xF) ^ (0x3 if top else 0)
    return crc


def code_bits(number: int) -> list[int]:
    """The 16 cell values (0 black, 1 white) for frame ``number`` (taken modulo 4096)."""
    if number < 0:
        raise ValueError(f"frame number {number} is negative")
    n = number % MODULUS
    word = (n << CHECK_BITS) | (crc4(n) ^ CHECK_MASK)
    return [(word >> (CELLS - 1 - i)) & 1 for i in range(CELLS)]


def stamp_rgb(rgb: np.ndarray, number: int) -> np.ndarray:
    """A copy of an (H, W, 3) uint8 frame with ``number`` stamped in its top rows."""
    out = np.array(rgb, dtype=np.uint8, copy=True)
    layout = StampLayout.for_size(out.shape[0], out.shape[1])
    ch, cw = layout.cell_h, layout.cell_w
    for (top, left), bit in zip(layout.cells(), code_bits(number)):
        out[top:top + ch, left:left + cw] = 255 if bit else 0
    return out


def stamp_yuv(yuv: np.ndarray, number: int) -> np.ndarray:
    """A copy of an I420 frame ((H * 3 // 2, W) uint8) with ``number`` stamped: luma 16/235, chroma neutral."""
    out = np.array(yuv, dtype=np.uint8, copy=True)
    width, height = out.shape[1], out.shape[0] * 2 // 3
    layout = StampLayout.for_size(height, width)
    ch, cw = layout.cell_h, layout.cell_w
    # I420 below the luma plane: the U plane then the V plane, each (H/2, W/2), stored as H/4 rows of W.
    # Neutral chroma under the band, so that RGB readers (a browser's canvas) see pure black and white.
    u = out[height:height + height // 4].reshape(height // 2, width // 2)
    v = out[height + height // 4:].reshape(height // 2, width // 2)
    used = min(CELLS, layout.per_row) * cw // 2
    u[:layout.band // 2, :used] = 128
    v[:layout.band // 2, :used] = 128
    for (top, left), bit in zip(layout.cells(), code_bits(number)):
        out[top:top + ch, left:left + cw] = Y_WHITE if bit else Y_BLACK
    return out


def read_cells(levels: list[float] | np.ndarray, black: float = 0.0, white: float = 255.0) -> int | None:
    """Frame number (modulo 4096) from the 16 cell means, or None if any cell is unclear or the CRC fails."""
    if len(levels) != CELLS:
        raise ValueError(f"expected {CELLS} cell levels, got {len(levels)}")
    mid = (black + white) / 2
    margin = MARGIN * (white - black) / 255
    word = 0
    for level in levels:
        if abs(level - mid) < margin:
            return None
        word = (word << 1) | int(level > mid)
    number, check = word >> CHECK_BITS, word & ((1 << CHECK_BITS) - 1)
    return number if crc4(number) ^ CHECK_MASK == check else None


def cell_levels(plane: np.ndarray) -> list[float]:
    """Mean of the central half of each cell of a 2-D (H, W) plane (luma or gray)."""
    layout = StampLayout.for_size(plane.shape[0], plane.shape[1])
    return [float(plane[t:t + h, l:l + w].mean()) for t, l, h, w in layout.centers()]


def read_stamp_luma(luma: np.ndarray) -> int | None:
    """Frame number (modulo 4096) from an (H, W) limited-range luma plane, e.g. ``frame.to_ndarray()[:H]``."""
    return read_cells(cell_levels(luma), Y_BLACK, Y_WHITE)


def read_stamp_rgb(rgb: np.ndarray) -> int | None:
    """Frame number (modulo 4096) from an (H, W, 3) uint8 RGB frame; None if it carries no stamp."""
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) frame, got {rgb.shape}")
    gray = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114  # BT.601 luma weights
    return read_cells(cell_levels(gray))


def unwrap(code: int, previous: int | None) -> int:
    """The frame number congruent to ``code`` (mod 4096) nearest to ``previous`` (the last one read).

    Frame numbers only grow during a stream, but a viewer may miss frames; nearest (not next) also keeps an
    out-of-order read right. Without a previous read the code itself is the number (the first 4096 frames).
    """
    if previous is None:
        return code
    base = previous - previous % MODULUS + code
    return min((base - MODULUS, base, base + MODULUS), key=lambda n: abs(n - previous))


@dataclass(frozen=True, slots=True)  # slots: thousands of these per session
class StampRecord:
    """When the server played a stamped frame: its number, section, and times (time.monotonic())."""

    index: int
    section: int
    generated: float  # the frame entered the session's buffer
    sent: float  # the track handed it to the encoders (first tick showing it)

    def as_list(self) -> list[float | int]:
        return [self.index, self.section, round(self.generated, 6), round(self.sent, 6)]


class StampLog:
    """The send times of a session's stamped frames, the newest ``capacity`` of them (thread-safe reads).

    Written on the event loop by the track; read by an in-process benchmark or the stamps endpoint.
    """

    def __init__(self, capacity: int = 18_000) -> None:  # 10 minutes at 30 fps, about 4 MB
        self.capacity = capacity
        self._records: OrderedDict[int, StampRecord] = OrderedDict()
        self._lock = threading.Lock()

    def record(self, index: int, section: int, generated: float, sent: float) -> None:
        with self._lock:
            self._records[index] = StampRecord(index, section, generated, sent)
            while len(self._records) > self.capacity:
                self._records.popitem(last=False)

    def get(self, index: int) -> StampRecord | None:
        with self._lock:
            return self._records.get(index)

    def since(self, index: int = 0, limit: int = 10_000) -> list[StampRecord]:
        """Records of frames numbered ``index`` and up, oldest first, at most ``limit``."""
        with self._lock:
            out = [r for r in self._records.values() if r.index >= index]
        return out[:limit]

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)
