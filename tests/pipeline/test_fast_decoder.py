"""The fast streaming decoder (pipeline/fast_decoder.py): frame layout, streaming in either direction equal to one
decode of the whole clip, the optional model-folder part, the pipeline's choice, batched streams, and training."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from framepack_rt.pipeline.batching import StreamBatch
from framepack_rt.pipeline.fast_decoder import CausalStreamingDecoder, FastVideoDecoder, load_fast_decoder
from framepack_rt.pipeline.framepack_pipeline import FramePackPipeline
from framepack_rt.pipeline.model_folders import MissingModelPart, resolve_model_paths
from framepack_rt.pipeline.tiny_models import write_tiny_models
from framepack_rt.pipeline.vae import StreamingDecoder, VideoVAE, assemble, frame_count, to_uint8


@pytest.fixture(scope="module")
def fast() -> FastVideoDecoder:
    torch.manual_seed(0)
    return FastVideoDecoder(block_out_channels=(16, 8, 8, 8)).eval()


@pytest.mark.parametrize("hw", [(3, 5), (8, 8)])
def test_frames_per_latent_as_the_vae_lays_them_out(fast, hw):
    z = torch.randn(2, 16, 4, *hw)
    with torch.no_grad():
        clip, more = fast(z), fast(z, previous=torch.randn(2, 16, 1, *hw))
    assert clip.shape == (2, 3, frame_count(4), hw[0] * 8, hw[1] * 8)
    assert more.shape == (2, 3, 16, hw[0] * 8, hw[1] * 8)


def test_frames_of_a_latent_depend_only_on_it_and_the_one_before(fast):
    z = torch.randn(1, 16, 5, 4, 4)
    changed = z.clone()
    changed[:, :, 3] += 1.0
    with torch.no_grad():
        a, b = fast(z), fast(changed)
    differs = (a - b).abs().amax(dim=(0, 1, 3, 4)) > 0
    # latent 3 covers frames 9-12 and is the context of latent 4 (frames 13-16); nothing before frame 9 moves
    assert not differs[:9].any() and differs[9:].all()


def _latents(n: int, hw=(4, 6)) -> torch.Tensor:
    return torch.randn(16, n, *hw, generator=torch.Generator().manual_seed(n))


def test_forward_stream_equals_one_decode_and_holds_nothing_back(fast):
    z = _latents(1 + 9 + 9 + 9)
    whole = to_uint8(fast(z[None]).detach())[0]
    decoder = CausalStreamingDecoder(fast)
    chunks = [decoder.push(z[:, :1])] + [decoder.push(z[:, i : i + 9]) for i in (1, 10, 19)]
    # the start latent alone waits for the first section (which then begins at frame 0, as with the VAE)
    assert [(c.start, len(c.frames)) for c in chunks] == [(0, 0), (0, 37), (37, 36), (73, 36)]
    tail = decoder.finish()
    assert (tail.start, len(tail.frames)) == (109, 0)
    assert decoder.latents_decoded == [0, 10, 9, 9, 0]
    alone = CausalStreamingDecoder(fast)
    alone.push(z[:, :1])
    assert len(alone.finish().frames) == 1
    got = assemble(chunks)
    assert got.shape == whole.shape
    assert (got.int() - whole.int()).abs().max() <= 1  # batch-size dependent conv rounding, at most one level


def test_a_first_push_with_the_start_latent_in_it_starts_at_frame_0(fast):
    z = _latents(10)
    decoder = CausalStreamingDecoder(fast)
    first, second = decoder.push(z[:, :10]), decoder.push(z[:, :1])
    assert (first.start, len(first.frames), second.start, len(second.frames)) == (0, 37, 37, 4)


def test_backward_one_latent_sections(fast):
    """Sections of one latent in the middle: each waits for its predecessor, the clip still assembles."""
    z = _latents(6)
    whole = to_uint8(fast(z[None]).detach())[0]
    decoder = CausalStreamingDecoder(fast, direction="backward", total_latents=6)
    chunks = [decoder.push(z[:, 3:6]), decoder.push(z[:, 2:3]), decoder.push(z[:, 1:2]), decoder.push(z[:, :1])]
    assert [(c.start, len(c.frames)) for c in chunks] == [(13, 8), (9, 4), (5, 4), (0, 5)]
    decoder.finish()
    assert (assemble(chunks).int() - whole.int()).abs().max() <= 1


def test_backward_stream_assembles_the_same_clip(fast):
    total = 1 + 9 + 9
    z = _latents(total)
    whole = to_uint8(fast(z[None]).detach())[0]
    decoder = CausalStreamingDecoder(fast, direction="backward", total_latents=total)
    chunks = [decoder.push(z[:, 10:19]), decoder.push(z[:, 1:10]), decoder.push(z[:, :1])]
    # a section's first latent waits for the one before it: 8 latents, then 8 + 1, then latent 0 and latent 1
    assert [(c.start, len(c.frames)) for c in chunks] == [(41, 32), (5, 36), (0, 5)]
    decoder.finish()
    assert (assemble(chunks).int() - whole.int()).abs().max() <= 1


def test_misuse_is_refused_with_what_to_do(fast):
    with pytest.raises(ValueError, match="total_latents"):
        CausalStreamingDecoder(fast, direction="backward")
    with pytest.raises(ValueError, match="direction"):
        CausalStreamingDecoder(fast, direction="sideways")
    backward = CausalStreamingDecoder(fast, direction="backward", total_latents=5)
    backward.push(_latents(3))
    with pytest.raises(ValueError, match="more latents"):
        backward.push(_latents(3))
    with pytest.raises(ValueError, match="incomplete"):
        backward.finish()
    forward = CausalStreamingDecoder(fast)
    with pytest.raises(ValueError, match="expected"):
        forward.push(torch.zeros(2, 16, 1, 4, 4))
    forward.finish()
    with pytest.raises(RuntimeError, match="after finish"):
        forward.push(_latents(1))


def test_model_folder_part_is_optional_and_belongs_to_its_vae(tmp_path, fast):
    write_tiny_models(tmp_path)
    assert resolve_model_paths(tmp_path).fast_decoder is None
    fast.save_pretrained(tmp_path / "fast_decoder")
    assert resolve_model_paths(tmp_path).fast_decoder == tmp_path / "fast_decoder"
    # another VAE in use: this folder's fast decoder (trained for its own VAE) is not picked up
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "vae", other / "vae")
    assert resolve_model_paths(tmp_path, vae=other / "vae").fast_decoder is None
    with pytest.raises(MissingModelPart, match="FastVideoDecoder"):
        resolve_model_paths(tmp_path, fast_decoder=tmp_path / "vae_missing")
    loaded = load_fast_decoder(tmp_path / "fast_decoder")
    z = _latents(3)[None]
    with torch.no_grad():
        assert torch.equal(loaded(z), fast(z))


def test_a_fast_decoder_for_other_latents_is_refused(fast):
    from framepack_rt.demo.models import build_vae

    narrow = FastVideoDecoder(latent_channels=8, block_out_channels=(8, 8, 8, 8))
    with pytest.raises(ValueError, match="8 channels.*makes 16.*trained for this VAE"):
        VideoVAE(build_vae(), fast_decoder=narrow)
    coarse = FastVideoDecoder(block_out_channels=(8, 8, 8))  # 4x spatial
    with pytest.raises(ValueError, match="4x/4x"):
        VideoVAE(build_vae(), fast_decoder=coarse)
    assert VideoVAE(build_vae(), fast_decoder=fast).fast_scale == 1
    larger = FastVideoDecoder(block_out_channels=(8, 8, 8, 8, 8))  # 16x: frames twice the VAE's side
    assert VideoVAE(build_vae(), fast_decoder=larger).fast_scale == 2
    assert VideoVAE(build_vae()).fast_scale == 1


def test_a_fast_decoder_that_draws_larger_frames_sets_the_frame_size(tmp_path, image):
    """A 16x fast decoder for an 8x VAE: the stream's frames (and frame_size, read from the folders at load, which
    sizes the page's placeholder) are twice the bucket's side; with decoder 'vae' they are the bucket."""
    write_tiny_models(tmp_path)
    torch.manual_seed(0)
    FastVideoDecoder(block_out_channels=(16, 8, 8, 8, 8)).save_pretrained(tmp_path / "fast_decoder")
    pipe = FramePackPipeline.from_pretrained(tmp_path, buckets="tiny", device="cpu")
    h, w = pipe.frame_size(image, decoder="vae")
    assert pipe.frame_size(image) == pipe.frame_size(image, decoder="fast") == (2 * h, 2 * w)
    assert pipe.bucket(image) == (h, w)
    assert pipe.parts._vae is None  # answered from the folders' configs: nothing loaded
    for kind, size in (("auto", (2 * h, 2 * w)), ("vae", (h, w))):
        stream = pipe.stream(image, "a red ball", steps=1, decoder=kind, decode_overlap=False)
        assert [next(stream).frames.shape[1:3] for _ in range(2)] == [size, size]
    # parts built elsewhere: the pipeline asks their VAE
    assert FramePackPipeline(pipe.parts, buckets="tiny").frame_size(image) == (2 * h, 2 * w)
    vae_default = FramePackPipeline.from_pretrained(tmp_path, buckets="tiny", device="cpu", decoder="vae")
    assert vae_default.frame_size(image) == (h, w)


def test_pipeline_streams_with_the_fast_decoder_of_its_folder(tmp_path, fast, image):
    write_tiny_models(tmp_path)
    for model in ("tiny", tmp_path):  # "fast" without one: refused at load, before any session
        with pytest.raises(ValueError, match="no fast decoder"):
            FramePackPipeline.from_pretrained(model, buckets="tiny", device="cpu", decoder="fast")
    without = FramePackPipeline.from_pretrained(tmp_path, buckets="tiny", device="cpu")
    with pytest.raises(ValueError, match="no fast decoder"):
        without.stream(image, "a red ball", steps=1, decoder="fast")
    with pytest.raises(ValueError, match="unknown decoder"):
        without.stream(image, "a red ball", steps=1, decoder="taesd")
    fast.save_pretrained(tmp_path / "fast_decoder")
    pipe = FramePackPipeline.from_pretrained(tmp_path, buckets="tiny", device="cpu")
    for mode, seconds in (("f1", None), ("inverted", 2.0)):
        streams = {kind: pipe.stream(image, "a red ball", steps=1, mode=mode, seconds=seconds, decoder=kind,
                                     decode_overlap=False) for kind in ("auto", "vae")}
        assert isinstance(streams["auto"]._decoder, CausalStreamingDecoder)
        assert isinstance(streams["vae"]._decoder, StreamingDecoder)
        fast_sections, vae_sections = list(_take(streams["auto"], 3)), list(_take(streams["vae"], 3))
        # every frame of the clip comes out once; the fast decoder holds none back, so F1 sections run ahead
        if mode == "inverted":
            assert assemble_frames(fast_sections).shape == assemble_frames(vae_sections).shape
        else:
            assert [(s.first_frame, len(s.frames)) for s in fast_sections] == [(0, 37), (37, 36), (73, 36)]
            assert [len(s.frames) for s in vae_sections] == [25, 36, 36]
            assert fast_sections[0].frames.shape[1:] == vae_sections[0].frames.shape[1:]


def _take(stream, n: int):
    for _ in range(n):
        try:
            yield next(stream)
        except StopIteration:
            return


def assemble_frames(sections) -> np.ndarray:
    ordered = sorted(sections, key=lambda s: s.first_frame)
    position = 0
    for s in ordered:
        assert s.first_frame == position
        position += len(s.frames)
    return np.concatenate([s.frames for s in ordered])


def test_batched_streams_decode_with_their_own_decoders(pipe, fast, image):
    """Fast-decoder and VAE streams in one StreamBatch give their solo frames (the fast ones skip the VAE tile
    batching; the VAE ones still batch theirs)."""
    vae = pipe.parts.vae()
    vae.fast = fast
    try:
        specs = [("a red ball", 1, "fast"), ("a blue square moves", 2, "vae"), ("green", 3, "vae")]
        solo = [[next(s).frames for _ in range(2)] for s in
                (pipe.stream(image, p, seed=seed, steps=1, decode_overlap=False, decoder=d) for p, seed, d in specs)]
        streams = [pipe.stream(image, p, seed=seed, steps=1, decode_overlap=False, decoder=d) for p, seed, d in specs]
        batch, got = StreamBatch(), {0: [], 1: [], 2: []}
        for _ in range(10):
            for stream in streams:
                batch.join(stream)
            for stream, outcome in batch.step():
                assert not isinstance(outcome, BaseException), outcome
                got[streams.index(stream)].append(outcome.frames)
            if all(len(v) >= 2 for v in got.values()):
                break
        assert [len(f) for f in got[0][:2]] == [37, 36] and [len(f) for f in got[1][:2]] == [25, 36]
        for i in range(3):
            for expect, frames in zip(solo[i], got[i][:2], strict=True):
                assert np.abs(expect.astype(int) - frames.astype(int)).max() <= 1
    finally:
        vae.fast = None


def _flow_decoder(seed: int = 0) -> FastVideoDecoder:
    """A motion_flow decoder whose flow head is switched on (random, as after training)."""
    torch.manual_seed(seed)
    decoder = FastVideoDecoder(block_out_channels=(16, 8, 8, 8), motion_flow=True).eval()
    with torch.no_grad():
        decoder.flow_head[2].weight.normal_(0, 0.3)
    return decoder


def test_a_new_flow_head_leaves_the_decoder_it_grows_from_unchanged(fast):
    grown = FastVideoDecoder(block_out_channels=(16, 8, 8, 8), motion_flow=True).eval()
    missing = grown.load_state_dict(fast.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("flow_head.") for k in missing)
    z, before = torch.randn(1, 16, 3, 4, 5), torch.randn(1, 16, 1, 4, 5)
    with torch.no_grad():
        torch.testing.assert_close(grown(z), fast(z), rtol=0, atol=1e-5)
        torch.testing.assert_close(grown(z, before), fast(z, before), rtol=0, atol=1e-5)


def test_follow_flow_moves_each_frame_by_its_time_from_the_latents_middle():
    frames = torch.zeros(1, 4, 3, 32, 40)  # not square: x and y are normalised by their own sides
    frames[..., 12:18, 10:16] = 1.0  # the same square in all four frames
    flow = torch.zeros(1, 2, 4, 5)
    flow[:, 0], flow[:, 1] = 2.0, -2.0  # 2 px a frame right and up: frames at -3, -1, +1, +3 px from the middle
    moved = FastVideoDecoder.follow_flow(frames, flow)
    for k, shift in enumerate((-3, -1, 1, 3)):
        want = torch.roll(frames[0, k], shifts=(-shift, shift), dims=(1, 2))
        torch.testing.assert_close(moved[0, k], want, rtol=0, atol=1e-5)


def test_a_flow_decoder_keeps_the_frame_layout_causality_and_streaming():
    decoder = _flow_decoder()
    z = _latents(1 + 4 + 4, hw=(4, 4))
    with torch.no_grad():
        whole = decoder(z[None])
        changed = z.clone()
        changed[:, 3] += 1.0
        differs = (decoder(changed[None]) - whole).abs().amax(dim=(0, 1, 3, 4)) > 0
    assert whole.shape == (1, 3, frame_count(9), 32, 32)
    assert not differs[:9].any() and differs[9:17].all()
    still = FastVideoDecoder(block_out_channels=(16, 8, 8, 8), motion_flow=True).eval()
    still.load_state_dict({**decoder.state_dict(), "flow_head.2.weight": torch.zeros_like(decoder.flow_head[2].weight)})
    with torch.no_grad():
        unmoved = still(z[None])
    assert (whole[:, :, 1:] - unmoved[:, :, 1:]).abs().amax() > 0.01  # the flow moves the frames of latents 1..8
    torch.testing.assert_close(whole[:, :, 0], unmoved[:, :, 0], rtol=0, atol=1e-5)  # the start frame stays put
    forward = CausalStreamingDecoder(decoder)
    chunks = [forward.push(z[:, :1]), forward.push(z[:, 1:5]), forward.push(z[:, 5:]), forward.finish()]
    assert (assemble(chunks).int() - to_uint8(whole)[0].int()).abs().max() <= 1
    backward = CausalStreamingDecoder(decoder, direction="backward", total_latents=9)
    chunks = [backward.push(z[:, 5:]), backward.push(z[:, 1:5]), backward.push(z[:, :1]), backward.finish()]
    assert (assemble(chunks).int() - to_uint8(whole)[0].int()).abs().max() <= 1


def test_a_fast_decoder_used_at_latents_of_another_size_is_named_at_load(tmp_path, caplog):
    """A fast decoder that records the latent size it was trained on (train_decoder does) warns once at load when
    the pipeline's buckets make latents of another size, naming what to do; not at its own size, not when it
    records nothing, not with decoder 'vae'."""
    write_tiny_models(tmp_path)
    torch.manual_seed(0)
    FastVideoDecoder(block_out_channels=(16, 8, 8, 8), trained_latent_size=8).save_pretrained(tmp_path / "fast_decoder")
    logger = "framepack_rt.pipeline.framepack_pipeline"

    def warnings_at(buckets, **kwargs) -> list[str]:
        caplog.clear()
        with caplog.at_level("WARNING", logger=logger):
            FramePackPipeline.from_pretrained(tmp_path, buckets=buckets, device="cpu", **kwargs)
        return [r.getMessage() for r in caplog.records if r.name == logger]

    assert warnings_at(((64, 64),)) == []
    (message,) = warnings_at(((64, 64), (96, 96), (64, 80)))
    assert "trained on 8x8 latents" in message and "96x96, 80x64 frames" in message
    assert "train decoder --size N" in message and "decoder 'vae'" in message
    assert warnings_at(((96, 96),), decoder="vae") == []
    FastVideoDecoder(block_out_channels=(16, 8, 8, 8)).save_pretrained(tmp_path / "fast_decoder")  # size not recorded
    assert warnings_at(((96, 96),)) == []


def test_the_shipped_fast_decoder_records_its_size_and_warns_only_off_it(caplog):
    from framepack_rt.pipeline.builtin import demo_weights_dir

    folder = demo_weights_dir()
    logger = "framepack_rt.pipeline.framepack_pipeline"
    assert FastVideoDecoder.load_config(folder / "fast_decoder")["trained_latent_size"] == 12  # 96 px frames
    with caplog.at_level("WARNING", logger=logger):
        FramePackPipeline.from_pretrained("demo", device="cpu")
        assert not [r for r in caplog.records if r.name == logger]
        FramePackPipeline.from_pretrained(folder, buckets=((64, 64),), device="cpu")
    (message,) = [r.getMessage() for r in caplog.records if r.name == logger]
    assert "trained on 12x12 latents, but this pipeline generates 64x64 frames" in message
