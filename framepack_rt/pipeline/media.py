"""Images in, video out: resolution buckets, image fitting, prompt timelines, MP4 writing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Union

import numpy as np

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

ImageInput = Union[str, Path, np.ndarray, "PILImage"]  # what load_image reads

# FramePack's 640 bucket set (h, w), in the release's order: ties go to the later entry, as there.
BUCKETS_640 = (
    (416, 960), (448, 864), (480, 832), (512, 768), (544, 704), (576, 672), (608, 640),
    (640, 608), (672, 576), (704, 544), (768, 512), (832, 480), (864, 448), (960, 416),
)  # fmt: skip
# The built-in tiny model's set: multiples of 16 px (even latent sizes for 2x2 patches), CPU-fast.
BUCKETS_TINY = ((48, 96), (64, 80), (64, 64), (80, 64), (96, 48))
BUCKETS_DEMO = ((96, 96),)  # the demo model was trained on square 96x96 frames only
BUCKET_SETS = {"640": BUCKETS_640, "tiny": BUCKETS_TINY, "demo": BUCKETS_DEMO}
BUCKET_MULTIPLE = 16  # px: the VAE's 8x times the transformer's 2x2 patches


def bucket_set(buckets: str | Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """A resolution set by name (a key of BUCKET_SETS) or given as (height, width) pairs in pixels, each a
    positive multiple of 16 (whole 2x2 patches of 8x latents). Raises ValueError naming what to pass."""
    if isinstance(buckets, str):
        if buckets not in BUCKET_SETS:
            raise ValueError(f"unknown bucket set {buckets!r}: choose one of {', '.join(BUCKET_SETS)}, "
                             "or give (height, width) pairs")
        return BUCKET_SETS[buckets]
    pairs = tuple(tuple(int(v) for v in hw) for hw in buckets)
    bad = [hw for hw in pairs if len(hw) != 2 or min(hw) <= 0 or any(v % BUCKET_MULTIPLE for v in hw)]
    if not pairs or bad:
        raise ValueError(f"buckets are (height, width) pairs of positive multiples of {BUCKET_MULTIPLE} px, "
                         f"got {bad or 'none'}: round each side to a multiple of {BUCKET_MULTIPLE}")
    return pairs  # type: ignore[return-value]


def nearest_bucket(height: int, width: int, buckets: Iterable[tuple[int, int]] = BUCKETS_640) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest: min |h * bw - w * bh|, the last one on ties."""
    best, best_metric = None, float("inf")
    for bh, bw in buckets:
        metric = abs(height * bw - width * bh)
        if metric <= best_metric:
            best, best_metric = (bh, bw), metric
    assert best is not None, "empty bucket set"
    return best


def load_image(image: ImageInput) -> np.ndarray:
    """A path, PIL image or HxWx3/HxWx4 uint8 array -> HxWx3 uint8 RGB. Raises ValueError if unreadable."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise ValueError(f"{path}: no such image file")
        try:
            with Image.open(path) as img:
                return np.asarray(img.convert("RGB"))
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"{path}: not a readable image ({exc})") from None
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] not in (3, 4) or array.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 image, got {array.dtype} {array.shape}")
    return np.ascontiguousarray(array[..., :3])


def fit_to_bucket(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize so the image covers (h, w), then center-crop to it (the release's resize_and_center_crop)."""
    from PIL import Image

    target_h, target_w = size
    h, w = image.shape[:2]
    scale = max(target_h / h, target_w / w)
    new_w, new_h = max(target_w, round(w * scale)), max(target_h, round(h * scale))
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.LANCZOS))
    top, left = (new_h - target_h) // 2, (new_w - target_w) // 2
    return np.ascontiguousarray(resized[top : top + target_h, left : left + target_w])


@dataclass(frozen=True)
class PromptChange:
    seconds: float
    prompt: str


def parse_prompt_schedule(text: str) -> list[PromptChange]:
    """ "0:a ball rolls;3.5:the ball stops" -> time-ordered changes. The first must start at 0."""
    changes = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        stamp, sep, prompt = part.partition(":")
        try:
            seconds = float(stamp)
        except ValueError:
            seconds = None
        if not sep or seconds is None or seconds < 0 or not prompt.strip():
            raise ValueError(f"prompt schedule entry {part!r}: expected SECONDS:PROMPT, e.g. '3.5:the ball stops'")
        changes.append(PromptChange(seconds, prompt.strip()))
    if not changes:
        raise ValueError("empty prompt schedule: expected 'SECONDS:PROMPT;SECONDS:PROMPT...'")
    changes.sort(key=lambda c: c.seconds)
    if changes[0].seconds != 0:
        raise ValueError("the prompt schedule must start at 0 (e.g. '0:first prompt;4:second prompt')")
    return changes


def prompt_at(changes: list[PromptChange], seconds: float) -> str:
    """The prompt in force at ``seconds`` of video time."""
    current = changes[0].prompt
    for change in changes:
        if change.seconds <= seconds:
            current = change.prompt
    return current


class Mp4Writer:
    """H.264 MP4 at a fixed frame rate, written frame by frame with PyAV (frames HxWx3 uint8)."""

    def __init__(self, path: str | Path, fps: int = 30, crf: int = 18) -> None:
        import av

        self.path = Path(path)
        self.fps, self.crf = fps, crf
        self._container = av.open(str(self.path), mode="w")
        self._stream = None
        self.frames_written = 0

    def write(self, frames: np.ndarray) -> None:
        """frames: (T, H, W, 3) or (H, W, 3) uint8."""
        import av

        frames = frames[None] if frames.ndim == 3 else frames
        if self._stream is None:
            h, w = frames.shape[1:3]
            self._stream = self._container.add_stream("libx264", rate=self.fps)
            self._stream.width, self._stream.height = w - w % 2, h - h % 2  # yuv420p needs even sizes
            self._stream.pix_fmt = "yuv420p"
            # zerolatency: each frame is encoded when written. With x264's lookahead holding frames back, this
            # build (PyAV 18.1) encoded the same frames differently from run to run, up to 46/255 apart, even on
            # one thread. Without B-frames files are larger (1.56x on the tiny model's busy 64 px frames); the
            # same input gives the same video.
            self._stream.options = {"crf": str(self.crf), "tune": "zerolatency"}
        for frame in frames:
            frame = frame[: self._stream.height, : self._stream.width]
            for packet in self._stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                self._container.mux(packet)
            self.frames_written += 1

    def close(self) -> None:
        if self._stream is not None:
            for packet in self._stream.encode():
                self._container.mux(packet)
        self._container.close()

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
