"""Frame-number stamps (stream/stamp.py): the code, the round trip through I420, VP8 and H.264 (aiortc's own
encoders and decoders, as the server and the Python viewer use them) at 64x64 and 640x640, and the log."""

from __future__ import annotations

import fractions

import av
import numpy as np
import pytest

from framepack_rt.stream.buffer import rgb_to_yuv420, yuv420_to_rgb
from framepack_rt.stream.stamp import (CELLS, MODULUS, StampLayout, StampLog, code_bits, crc4, read_cells,
                                       read_stamp_luma, read_stamp_rgb, stamp_rgb, stamp_yuv, unwrap)


def scene(height: int, width: int, t: int, noise: float = 8.0) -> np.ndarray:
    """A smooth moving picture with some grain: what generated video looks like to an encoder."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 127 + 100 * np.sin((x + 3 * t) / max(4, width / 6))
    g = 127 + 100 * np.cos((y - 2 * t) / max(4, height / 5))
    b = (x + y + 5 * t) % 256
    rng = np.random.default_rng(t)
    rgb = np.stack([r, g, b], -1) + rng.normal(0, noise, (height, width, 3))
    return np.clip(rgb, 0, 255).astype(np.uint8)


def test_layout_fits_small_and_large_frames():
    small, large = StampLayout.for_size(64, 64), StampLayout.for_size(640, 640)
    assert (small.cell_w, small.cell_h, small.rows, small.band) == (4, 8, 1, 8)  # 8 rows of a 64-pixel frame
    assert (large.cell_w, large.cell_h, large.band) == (16, 16, 16)
    assert len(small.cells()) == CELLS and len(set(small.cells())) == CELLS
    with pytest.raises(ValueError):
        StampLayout.for_size(8, 8)


def test_code_has_a_crc_and_wraps():
    assert code_bits(5) == code_bits(5 + MODULUS)
    assert crc4(0) == 0 and crc4(1) != 0
    # Every single-bit error in the 16 cells is caught by the CRC.
    for n in (0, 1, 777, MODULUS - 1):
        bits = code_bits(n)
        assert read_cells([255.0 * b for b in bits]) == n
        for i in range(CELLS):
            flipped = list(bits)
            flipped[i] ^= 1
            assert read_cells([255.0 * b for b in flipped]) is None


def test_unclear_cells_and_unstamped_frames_read_as_none():
    assert read_cells([128.0] * CELLS) is None
    assert read_cells([0.0] * CELLS) is None and read_cells([255.0] * CELLS) is None  # uniform bands
    # The built-in start image (what the track shows before the first section) carries no stamp.
    from framepack_rt.stream.images import default_scene, resize_rgb

    for h, w in ((64, 80), (640, 640)):
        start = rgb_to_yuv420(resize_rgb(default_scene(), h, w))
        assert read_stamp_luma(start[:h]) is None and read_stamp_rgb(yuv420_to_rgb(start)) is None
    for t in range(20):
        assert read_stamp_rgb(scene(64, 64, t)) is None


@pytest.mark.parametrize("previous,code,expected", [
    (None, 17, 17), (100, 101, 101), (4095, 2, 4098), (4100, 4095, 4095), (9000, 9000 % 4096, 9000),
])
def test_unwrap(previous, code, expected):
    assert unwrap(code, previous) == expected


@pytest.mark.parametrize("size", [(64, 64), (64, 80), (640, 640)])
def test_round_trip_rgb_and_i420(size):
    h, w = size
    for n in (0, 1, 1234, 4095, 4096 + 7):
        rgb = stamp_rgb(scene(h, w, n), n)
        assert read_stamp_rgb(rgb) == n % MODULUS
        yuv = stamp_yuv(rgb_to_yuv420(scene(h, w, n)), n)
        assert read_stamp_luma(yuv[:h]) == n % MODULUS
        assert read_stamp_rgb(yuv420_to_rgb(yuv)) == n % MODULUS
    # Stamping leaves everything below the band alone and does not modify its input.
    original = rgb_to_yuv420(scene(h, w, 3))
    stamped = stamp_yuv(original, 3)
    band = StampLayout.for_size(h, w).band
    assert np.array_equal(stamped[band:h], original[band:h]) and not np.array_equal(stamped, original)


def _codec_round_trip(codec: str, h: int, w: int, frames: int, noise: float = 8.0,
                      bitrate: int | None = None) -> list[tuple[int, int | None]]:
    """Stamp ``frames`` frames, encode and decode them with aiortc's encoder/decoder pair for ``codec``
    (at its starting bitrate, or ``bitrate``: aiortc clamps it to the encoder's range)."""
    from aiortc.codecs.h264 import H264Decoder, H264Encoder, H264PayloadDescriptor
    from aiortc.codecs.vpx import Vp8Decoder, Vp8Encoder, VpxPayloadDescriptor
    from aiortc.jitterbuffer import JitterFrame

    enc, dec, desc = ((Vp8Encoder(), Vp8Decoder(), VpxPayloadDescriptor) if codec == "vp8" else
                      (H264Encoder(), H264Decoder(), H264PayloadDescriptor))
    if bitrate is not None:
        enc.target_bitrate = bitrate
    out = []
    for i in range(frames):
        n = 4000 + i * 7  # crosses the 4096 wrap
        frame = av.VideoFrame.from_ndarray(stamp_yuv(rgb_to_yuv420(scene(h, w, i, noise)), n), format="yuv420p")
        frame.pts, frame.time_base = i * 3000, fractions.Fraction(1, 90_000)
        payloads, timestamp = enc.encode(frame, i == 0)
        data = b"".join(desc.parse(p)[1] for p in payloads)
        for decoded in dec.decode(JitterFrame(data=data, timestamp=timestamp)):
            luma = decoded.to_ndarray(format="yuv420p")[:h]
            assert read_stamp_rgb(decoded.to_ndarray(format="rgb24")) == read_stamp_luma(luma)
            out.append((n % MODULUS, read_stamp_luma(luma)))
    return out


@pytest.mark.parametrize("codec", ["vp8", "h264"])
@pytest.mark.parametrize("size", [(64, 64), (640, 640)])
def test_stamps_survive_real_encoders(codec, size):
    frames = 30 if size[0] < 100 else 8
    results = _codec_round_trip(codec, *size, frames=frames)
    # Worst case: near-noise content at the encoder's lowest bitrate (aiortc clamps 1 bit/s to its minimum).
    results += _codec_round_trip(codec, *size, frames=frames, noise=120.0, bitrate=1)
    assert len(results) >= 2 * frames - 2
    assert all(read == sent for sent, read in results), [r for r in results if r[0] != r[1]]


def test_stamp_log_keeps_the_newest():
    log = StampLog(capacity=3)
    for i in range(5):
        log.record(i, section=i // 2, generated=float(i), sent=float(i) + 0.5)
    assert len(log) == 3 and log.get(0) is None and log.get(4).sent == 4.5
    assert [r.index for r in log.since(3)] == [3, 4]
    assert log.get(2).as_list() == [2, 1, 2.0, 2.5]
