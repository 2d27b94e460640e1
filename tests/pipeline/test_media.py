"""Buckets, image fitting, prompt timelines and MP4 writing."""

from __future__ import annotations

import av
import numpy as np
import pytest

from framepack_rt.pipeline.media import (
    BUCKETS_640, BUCKETS_TINY, Mp4Writer, bucket_set, fit_to_bucket, load_image, nearest_bucket, parse_prompt_schedule, prompt_at,
)


@pytest.mark.parametrize(
    "size, bucket",
    [((720, 1280), (480, 832)), ((1080, 1920), (480, 832)), ((512, 512), (640, 608)), ((1280, 720), (832, 480)),
     ((300, 1000), (416, 960)), ((600, 640), (608, 640))],
    ids=["720p", "1080p", "square-tie-goes-last", "portrait", "very-wide", "near-square"],
)
def test_nearest_bucket_640(size, bucket):
    assert nearest_bucket(*size, BUCKETS_640) == bucket


def test_tiny_buckets_are_patchable():
    assert all(h % 16 == 0 and w % 16 == 0 for h, w in BUCKETS_TINY)
    assert nearest_bucket(100, 100, BUCKETS_TINY) == (64, 64)


def test_a_bucket_set_is_named_or_given_as_patchable_pairs():
    assert bucket_set("tiny") == BUCKETS_TINY and bucket_set("640") == BUCKETS_640
    assert bucket_set([(96, 96)]) == ((96, 96),) and bucket_set(((32, 48), [64, 16])) == ((32, 48), (64, 16))
    with pytest.raises(ValueError, match="unknown bucket set 'huge': choose one of 640, tiny, demo"):
        bucket_set("huge")
    for bad in ([(96, 100)], [(0, 16)], [(16,)], []):
        with pytest.raises(ValueError, match="multiples of 16 px"):
            bucket_set(bad)


def test_fit_to_bucket_resizes_and_center_crops():
    image = np.zeros((100, 300, 3), np.uint8)
    image[:, 100:200] = 255  # a white band in the middle third
    out = fit_to_bucket(image, (64, 64))
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    # 100x300 scaled to cover 64x64 is 64x192; the middle 64 columns (the white band) are what is kept.
    assert out[:, 2:62].min() > 200


def test_load_image_errors(tmp_path):
    with pytest.raises(ValueError, match="no such image"):
        load_image(tmp_path / "missing.png")
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="not a readable image"):
        load_image(bad)
    with pytest.raises(ValueError, match="HxWx3"):
        load_image(np.zeros((4, 4), np.float32))


def test_prompt_schedule():
    changes = parse_prompt_schedule("3.5:the ball stops; 0:a ball rolls")
    assert [c.prompt for c in changes] == ["a ball rolls", "the ball stops"]
    assert prompt_at(changes, 3.4) == "a ball rolls" and prompt_at(changes, 3.5) == "the ball stops"
    for bad in ("", "x:y", "1:late start", "0:", "-1:neg"):
        with pytest.raises(ValueError):
            parse_prompt_schedule(bad)


def test_mp4_writer_frame_count_and_rate(tmp_path):
    path = tmp_path / "out.mp4"
    with Mp4Writer(path, fps=30) as writer:
        for i in range(3):
            writer.write(np.full((11, 48, 65, 3), i * 80, np.uint8))
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))
        assert stream.codec_context.name == "h264" and stream.average_rate == 30
    assert len(frames) == 33 and (frames[0].width, frames[0].height) == (64, 48)


def test_mp4_writer_output_does_not_depend_on_when_frames_arrive(tmp_path):
    """The same frames written in sections with different pauses between them (as a stream's sections arrive)
    decode to the same video: with x264's default lookahead they did not (up to 46/255 apart), even on one
    encoder thread."""
    import time

    from framepack_rt.demo.world import start_image
    from framepack_rt.pipeline.framepack_pipeline import FramePackPipeline

    image, _ = start_image(3, "a red ball moves right", num_objects=1)  # the tiny model's busy frames showed it
    frames = FramePackPipeline.from_pretrained("tiny").generate(image, "a red ball moves right", seed=3, seconds=2.5)

    def written(name: str, pauses: tuple[float, ...]) -> np.ndarray:
        with Mp4Writer(tmp_path / name) as writer:
            for i, part in enumerate((frames[:1], frames[1:37], frames[37:])):
                time.sleep(pauses[i % len(pauses)])
                writer.write(part)
        with av.open(str(tmp_path / name)) as container:
            return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])

    first = written("a.mp4", (0.0,))
    for k, pauses in enumerate([(0.0,), (0.0, 0.1, 0.2), (0.3,), (0.05,), (0.0, 0.2)]):
        assert np.array_equal(written(f"b{k}.mp4", pauses), first)
