"""The demo trainer at tiny size on the CPU: F1 context packing, windows, the flow-matching loop, resume, FSDP."""

from __future__ import annotations

import json
import shutil
import socket

import numpy as np
import pytest
import torch

from framepack_rt.engine.context import ContextRing
from framepack_rt.demo import train as T
from framepack_rt.demo.data import (
    LatentCache,
    LatentClip,
    WindowDataset,
    collate,
    history_before,
    pack_context,
    valid_windows,
)
from framepack_rt.engine.schedules import f1_layout, f1_schedule, vanilla_layout, vanilla_schedule


def synthetic_cache(clips: int = 2, latents: int = 30, hw: int = 4, text_dim: int = 32, seed: int = 0) -> LatentCache:
    """Random latents with a prompt change in the middle of every clip; a random prompt table."""
    g = torch.Generator().manual_seed(seed)
    prompts = {"a red ball moves right": (torch.randn(5, text_dim, generator=g), torch.randn(text_dim, generator=g)),
               "a red ball moves left": (torch.randn(6, text_dim, generator=g), torch.randn(text_dim, generator=g))}
    cache = LatentCache(prompts=prompts)
    for _ in range(clips):
        names = ["a red ball moves right"] * (latents // 2) + ["a red ball moves left"] * (latents - latents // 2)
        cache.clips.append(LatentClip(torch.randn(latents, 16, hw, hw, generator=g).half(), names,
                                      torch.randn(3, text_dim, generator=g)))
    return cache


@pytest.mark.parametrize("schedule, layout", [(f1_schedule(9), f1_layout(9)), (vanilla_schedule(9), vanilla_layout(9))])
def test_packed_windows_equal_what_the_stream_packs(schedule, layout):
    """A window at s = 1 + k w packs exactly as ContextRing packs section k of a stream over the same latents."""
    lat = torch.randn(50, 16, 4, 6)
    ring = ContextRing.for_schedule(schedule, height=4, width=6)
    ring.reset(lat[0][None, :, None])
    for k in range(5):
        s = 1 + k * 9
        want = ring.inputs(layout).clone()
        got = pack_context(layout, lat[0][None, :, None], history_before(lat, s, 19).transpose(0, 1)[None])
        for name, value in want.as_kwargs().items():
            other = getattr(got, name)
            assert (value is None) == (other is None), name
            if value is not None:
                assert torch.equal(value, other), (name, k)
        ring.push(lat[s : s + 9].transpose(0, 1)[None])


def test_history_is_zero_padded_before_the_clip():
    lat = torch.arange(1, 11, dtype=torch.float32).view(10, 1, 1, 1).expand(10, 16, 2, 2)
    h = history_before(lat, 3, 19)
    assert h.shape == (19, 16, 2, 2) and h[:16].abs().sum() == 0
    assert [float(h[i, 0, 0, 0]) for i in (16, 17, 18)] == [1.0, 2.0, 3.0]
    assert torch.equal(history_before(lat, 10, 5)[:, 0, 0, 0], torch.tensor([6.0, 7, 8, 9, 10]))


def test_windows_keep_one_prompt_and_favour_changes_and_first_sections():
    cache = synthetic_cache(latents=30)
    clip = cache.clips[0]
    starts = valid_windows(clip, 9)
    assert all(len(set(clip.prompts[s : s + 9])) == 1 for s in starts)
    assert 15 in starts and 14 not in starts and 7 not in starts and 6 in starts  # change at latent 15
    ds = WindowDataset(cache, window=9, change_repeat=3, first_repeat=2)
    counts = {s: sum(1 for c, t in ds.index if c == 0 and t == s) for s in (1, 2, 15)}
    assert counts == {1: 3, 2: 1, 15: 4}
    item = ds[ds.index.index((0, 15))]
    assert item["prompt"] == "a red ball moves left" and item["target"].shape == (16, 9, 4, 4)
    assert torch.equal(item["target"], clip.latents[15:24].float().transpose(0, 1))
    assert item["history"].shape == (16, 19, 4, 4) and item["start"].shape == (16, 1, 4, 4)
    batch = collate([ds[0], item], cache.prompts)
    assert batch["text"].shape == (2, 6, 32) and batch["text_mask"].sum(1).tolist() == [5, 6]
    assert batch["text"][0, 5].abs().sum() == 0


def tiny_model(text_dim: int = 32):
    from framepack_rt.model.config import FramePackConfig
    from framepack_rt.model.transformer import FramePackTransformer

    return FramePackTransformer.from_config(FramePackConfig.preset("tiny"), seed=0)


def test_loss_is_finite_and_falls_on_a_fixed_batch():
    cache = synthetic_cache()
    ds = WindowDataset(cache)
    batch = collate([ds[i] for i in range(4)], cache.prompts)
    model = tiny_model().train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(12):
        for layout in (f1_layout(9), vanilla_layout(9)):  # both layouts the trainer mixes
            loss = T.flow_matching_loss(model, batch, layout, torch.Generator().manual_seed(0), shift=1.6)
            assert torch.isfinite(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4])


@pytest.mark.parametrize("dropout", [0.0, 0.5, 1.0], ids=lambda p: f"text_dropout_{p}")
def test_text_dropout_zeroes_the_text_of_that_fraction_of_samples(dropout):
    """Dropped samples see exactly the engine's default negative (zero text and pooled embeddings, the mask
    kept); with dropout off no extra random number is drawn, so earlier recipes reproduce."""
    cache = synthetic_cache()
    ds = WindowDataset(cache)
    batch = collate([ds[i] for i in range(8)], cache.prompts)
    model, seen = tiny_model(), {}
    original = model.forward

    def recording(**kwargs):
        seen.update(kwargs)
        return original(**kwargs)

    model.forward = recording
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        T.flow_matching_loss(model, batch, f1_layout(9), generator, shift=1.6, text_dropout=dropout)
    dropped = seen["encoder_hidden_states"].flatten(1).abs().amax(dim=1) == 0
    assert torch.equal(dropped, seen["pooled_projections"].abs().amax(dim=1) == 0)
    assert torch.equal(seen["encoder_attention_mask"], batch["text_mask"])
    kept = ~dropped
    torch.testing.assert_close(seen["encoder_hidden_states"][kept], batch["text"][kept].to(seen["encoder_hidden_states"].dtype))
    expected = {0.0: 0, 1.0: 8}.get(dropout)
    assert int(dropped.sum()) == expected if expected is not None else 0 < int(dropped.sum()) < 8
    if dropout == 0.0:  # the generator advanced exactly as without the option
        reference = torch.Generator().manual_seed(3)
        with torch.no_grad():
            T.flow_matching_loss(tiny_model(), batch, f1_layout(9), reference, shift=1.6)
        assert torch.equal(generator.get_state(), reference.get_state())


def test_motion_weights_mark_what_changes_against_the_latent_before_the_window():
    start = torch.zeros(2, 16, 1, 6, 6)
    history = torch.zeros(2, 16, 19, 6, 6)
    history[1, :, -1] = 0.3  # clip 1 is mid-clip: its reference is the last history latent, not the start
    target = torch.zeros(2, 16, 3, 6, 6)
    target[1] = 0.3
    target[0, :, 1, 2, 2] = 2.0  # one latent pixel changes in frame 1 of clip 0 (first section: vs the start)
    w = T.motion_weights(target, start, history, strength=4.0)
    assert w.shape == (2, 1, 3, 6, 6)
    assert torch.all(w[1] == 1.0)  # nothing moved relative to the latent before it
    assert torch.all(w[0, :, 0] == 1.0) and torch.all(w[0, :, 2] == 1.0)
    assert torch.all(w[0, 0, 1, 1:4, 1:4] == 5.0)  # the changed pixel and its 3x3 neighbourhood
    assert w[0, 0, 1].sum() == 36 + 4 * 9


def test_motion_weighted_loss_equals_plain_mse_when_nothing_moves():
    cache = synthetic_cache()
    ds = WindowDataset(cache)
    batch = collate([ds[i] for i in range(2)], cache.prompts)
    for x in ("target", "start", "history"):
        batch[x] = torch.zeros_like(batch[x])
    model = tiny_model()
    with torch.no_grad():
        plain = T.flow_matching_loss(model, batch, f1_layout(9), torch.Generator().manual_seed(0), shift=1.6)
        weighted = T.flow_matching_loss(model, batch, f1_layout(9), torch.Generator().manual_seed(0), shift=1.6,
                                        motion_weight=4.0)
    assert weighted.item() == pytest.approx(plain.item(), rel=1e-6)


def test_history_noise_leaves_empty_slots_exact_and_stays_within_its_std():
    history = torch.zeros(64, 16, 19, 4, 4)
    history[:, :, 16:] = 1.0  # three real latents at the newest end, zeros before the clip start
    g = torch.Generator().manual_seed(0)
    noisy = T.noisy_history(history, 0.2, g)
    assert torch.equal(noisy[:, :, :16], history[:, :, :16])  # the stream holds exact zeros there
    diff = noisy[:, :, 16:] - 1.0
    stds = diff.flatten(1).std(dim=1)
    assert stds.max() <= 0.2 * 1.1 and stds.min() < 0.05 and stds.max() > 0.15  # per-sample std in [0, 0.2]
    assert T.noisy_history(history, 0.0, g) is history


def test_learning_rate_warms_up_then_decays_to_the_floor():
    rates = [T.learning_rate(step, 1e-3, 10, 110, 0.05) for step in range(120)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)  # linear warmup
    assert all(a >= b for a, b in zip(rates[9:], rates[10:]))  # then never rises
    assert rates[60] == pytest.approx(1e-3 * (0.05 + 0.95 * 0.5))  # half-way down the cosine
    assert rates[110] == rates[119] == pytest.approx(5e-5)  # the floor, and it stays there


def _args(tmp_path, *extra: str):
    return T.parser().parse_args(["transformer", "--out", str(tmp_path), "--tiny", "--batch", "2", "--warmup", "2",
                                  "--log-every", "1", "--save-every", "2", "--device", "cpu", *extra])


def _tiny_cache(tmp_path):
    cache = synthetic_cache(text_dim=64, latents=24)
    cache.save(tmp_path / "latents.pt")


def _log(tmp_path):
    return [json.loads(line) for line in (tmp_path / "transformer_log.jsonl").read_text().splitlines()]


def test_train_transformer_checkpoints_and_resumes(tmp_path):
    from framepack_rt.model.transformer import FramePackTransformer

    _tiny_cache(tmp_path)
    T.train_transformer(_args(tmp_path, "--steps", "3"))  # EMA on by default (single process)
    first = _log(tmp_path)
    assert [r["step"] for r in first] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in first)
    assert torch.load(tmp_path / "transformer_ckpt" / "state.pt", weights_only=False)["step"] == 3
    T.train_transformer(_args(tmp_path, "--steps", "5"))
    assert [r["step"] for r in _log(tmp_path)][3:] == [4, 5]  # picked up at step 4, not from scratch
    assert _log(tmp_path)[-1]["lr"] == pytest.approx(T.learning_rate(4, 5e-4, 2, 5, 0.05))  # the schedule's
    model = FramePackTransformer.from_pretrained(tmp_path / "transformer")
    state = torch.load(tmp_path / "transformer_ckpt" / "state.pt", weights_only=False)
    assert state["step"] == 5
    for k, v in model.state_dict().items():  # the folder holds the EMA weights
        assert torch.equal(v, state["ema"][k])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp_path_on_gloo_world_size_1(tmp_path, monkeypatch):
    """FullyShardedDataParallel (torch 2.13 runs it on the CPU over gloo; with one rank it does not shard),
    DistributedSampler, sharded torch.distributed.checkpoint save and resume, the gathered export."""
    from framepack_rt.model.transformer import FramePackTransformer

    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    _tiny_cache(tmp_path)
    # Fine-tuning path: --init reads a diffusers folder (the 13B's role here), rank 0 broadcasts it.
    start = T.build_transformer(_args(tmp_path), T.D.DistInfo())
    start.save_pretrained(tmp_path / "init")
    flags = ["--fsdp", "--ema", "0", "--grad-checkpoint", "--init", str(tmp_path / "init")]
    T.train_transformer(_args(tmp_path, "--steps", "2", *flags))
    assert (tmp_path / "transformer_ckpt" / "sharded").is_dir()
    T.train_transformer(_args(tmp_path, "--steps", "3", *flags))
    assert [r["step"] for r in _log(tmp_path)] == [1, 2, 3]
    model = FramePackTransformer.from_pretrained(tmp_path / "transformer")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    before = start.state_dict()
    after = model.state_dict()
    assert set(after) == set(before) and any(not torch.equal(after[k], before[k]) for k in before)  # it trained


def test_batches_split_windows_across_ranks():
    cache = synthetic_cache(latents=30)
    ds = WindowDataset(cache)
    seen = []
    for rank in (0, 1):
        info = T.D.DistInfo(rank=rank, world_size=2)
        stream = T.batches(ds, cache.prompts, 2, info, seed=0, start_step=0)
        seen.append([next(stream)[1]["target"] for _ in range(3)])
    assert not torch.equal(seen[0][0], seen[1][0])
    # resuming at a step yields the batch that step had
    again = T.batches(ds, cache.prompts, 2, T.D.DistInfo(rank=0, world_size=2), seed=0, start_step=2)
    step, batch = next(again)
    assert step == 2 and torch.equal(batch["target"], seen[0][2])


def test_vae_batch_is_clip_pixels_of_seeds_from_the_rng():
    """The VAE's batches are the decoder stage's clips (one renderer, one mask) on seeds drawn in order from the
    step's generator: a resumed run redraws the same batch; a frame count the causal VAE cannot hold is refused."""
    from framepack_rt.demo.train_decoder import clip_pixels
    from framepack_rt.demo.world import WorldConfig

    cfg = WorldConfig(size=32)
    pixels, fg = T.vae_batch(np.random.default_rng([3, 7]), 3, 9, cfg)
    seeds = [int(s) for s in np.random.default_rng([3, 7]).integers(2**31, size=3)]
    want, want_fg = clip_pixels(seeds, 3, cfg)
    assert pixels.shape == (3, 3, 9, 32, 32) and torch.equal(pixels, want) and torch.equal(fg, want_fg)
    assert 0 < fg.mean() < 0.5  # the shapes, not the background
    assert torch.equal(T.vae_batch(np.random.default_rng([3, 7]), 3, 9, cfg)[0], pixels)
    with pytest.raises(ValueError, match="4 N - 3 frames.*got 8.*--frames"):
        T.vae_batch(np.random.default_rng(0), 1, 8, cfg)


def test_vae_stage_trains_and_sets_the_scaling_factor(tmp_path):
    from diffusers import AutoencoderKLHunyuanVideo

    args = T.parser().parse_args(["vae", "--out", str(tmp_path), "--size", "32", "--frames", "5", "--vae-steps", "2",
                                  "--vae-batch", "1", "--log-every", "1"])
    T.train_vae(T.vae_stage_args(args))
    log = [json.loads(line) for line in (tmp_path / "vae_log.jsonl").read_text().splitlines()]
    assert [r.get("step") for r in log[:2]] == [1, 2] and all(np.isfinite(r["loss"]) for r in log[:2])
    vae = AutoencoderKLHunyuanVideo.from_pretrained(tmp_path / "vae")
    assert vae.config.scaling_factor == pytest.approx(log[-1]["scaling_factor"]) and vae.config.scaling_factor != 1.0


def test_encode_stage_caches_the_worlds_clips_with_their_prompts(tmp_path):
    """Stage 1b on a random 32 px VAE: one clip per seed, each latent with the prompt in force; --turn-rate
    reaches the world (its clips are the ones world.make_clip draws with that rate)."""
    from framepack_rt.demo.world import WorldConfig, frames_for_latents, make_clip

    torch.manual_seed(0)
    T.build_vae().save_pretrained(tmp_path / "vae")
    args = T.parser().parse_args(["encode", "--out", str(tmp_path), "--size", "32", "--seed", "4", "--clips", "2",
                                  "--clip-latents", "40", "--turn-rate", "1"])
    cache = LatentCache.load(T.encode_world(args))
    assert len(cache.clips) == 2
    for i, clip in enumerate(cache.clips):
        world = make_clip(4 * 1_000_003 + i, frames_for_latents(40), WorldConfig(size=32, turn_rate=1.0))
        assert clip.latents.shape[0] == 40 and clip.prompts == [world.prompt_at_latent(j) for j in range(40)]
    random = [make_clip(4 * 1_000_003 + i, frames_for_latents(40), WorldConfig(size=32)) for i in range(2)]
    assert [c.prompts for c in cache.clips] != [[w.prompt_at_latent(j) for j in range(40)] for w in random]


def test_encode_stage_passes_its_world_margin_to_the_world(tmp_path, monkeypatch):
    """--world-margin reaches world.WorldConfig.margin (below 0 objects stop partly outside the frame); its
    default is the world's own margin, so caches made without it are unchanged."""
    from framepack_rt.demo.world import WorldConfig

    assert T.parser().parse_args(["encode", "--out", str(tmp_path)]).world_margin == WorldConfig().margin
    torch.manual_seed(0)
    T.build_vae().save_pretrained(tmp_path / "vae")
    seen = []
    real = T.make_clip
    monkeypatch.setattr(T, "make_clip", lambda seed, frames, cfg: seen.append(cfg) or real(seed, frames, cfg))
    args = T.parser().parse_args(["encode", "--out", str(tmp_path), "--size", "32", "--clips", "1",
                                  "--clip-latents", "8", "--world-margin", "-0.05"])
    T.encode_world(args)
    assert [c.margin for c in seen] == [-0.05] and seen[0].size == 32


FSDP_TIMEOUT = 300  # seconds per torchrun of 2 ranks (about 20 s on an idle 2-core machine)


def _torchrun_2(run_bounded, tmp_path, *flags: str) -> None:
    """``torchrun --nproc-per-node 2 -m framepack_rt.demo.train transformer --fsdp ...`` on 127.0.0.1, in its own
    session: killed with its workers if it outlives FSDP_TIMEOUT."""
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "framepack_rt.demo.train", "transformer", "--out", str(tmp_path),
           "--tiny", "--batch", "2", "--warmup", "2", "--log-every", "1", "--save-every", "2", "--device", "cpu",
           "--ema", "0", "--fsdp", *flags]
    done = run_bounded(cmd, FSDP_TIMEOUT, env={"GLOO_SOCKET_IFNAME": "lo", "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stdout[-3000:]


@pytest.mark.slow  # 35 s; the FSDP path at world size 1 runs by default
def test_fsdp_sharded_over_2_ranks_takes_the_steps_of_one_process(tmp_path, run_bounded):
    """FSDP at world size 2 on gloo (each rank writes its own checkpoint shard): 2 steps, a sharded save, a
    resume and a third step give the weights one process gets from 3 steps with --accumulate 2 (the same windows
    and noise: micro-batch i is drawn as rank i draws it), within fp32 reduction order."""
    from framepack_rt.model.transformer import FramePackTransformer

    two, one = tmp_path / "two", tmp_path / "one"
    for folder in (two, one):
        folder.mkdir()
        _tiny_cache(folder)
    _torchrun_2(run_bounded, two, "--steps", "2")
    assert (two / "transformer_ckpt" / "sharded").is_dir()
    shards = sorted(p.name for p in (two / "transformer_ckpt" / "sharded").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]  # each rank wrote its own shard
    _torchrun_2(run_bounded, two, "--steps", "3")  # resumes at step 3 from the sharded checkpoint
    assert [r["step"] for r in _log(two)] == [1, 2, 3]
    T.train_transformer(_args(one, "--steps", "3", "--accumulate", "2", "--ema", "0"))
    sharded = FramePackTransformer.from_pretrained(two / "transformer").state_dict()
    single = FramePackTransformer.from_pretrained(one / "transformer").state_dict()
    start = T.build_transformer(_args(one), T.D.DistInfo()).state_dict()
    moved = max((single[k] - start[k]).abs().max().item() for k in start)
    err = max((sharded[k] - single[k]).abs().max().item() for k in single)
    assert moved > 5e-4, f"3 steps moved the weights by only {moved:.1e}: nothing to compare"
    assert err <= 2e-5, f"FSDP over 2 ranks vs one process: max |diff| {err:.2e} (weights moved {moved:.1e})"
    grad_norms = [[r["grad_norm"] for r in _log(folder)] for folder in (two, one)]
    assert grad_norms[0] == pytest.approx(grad_norms[1], rel=1e-4)  # the same gradients, step by step


def _decoder_stage(tmp_path, steps: int, *more: str) -> list[dict]:
    args = T.parser().parse_args(["decoder", "--out", str(tmp_path), "--size", "32", "--decoder-steps", str(steps),
                                  "--decoder-clips", "4", "--decoder-batch", "4", "--decoder-latents", "2",
                                  "--decoder-widths", "16,8,8,8", "--log-every", "1", "--save-every", "5", *more])
    from framepack_rt.demo.train_decoder import train_decoder

    train_decoder(args)
    return [json.loads(line) for line in (tmp_path / "decoder_log.jsonl").read_text().splitlines()]


def test_decoder_stage_learns_resumes_and_keeps_its_cache(tmp_path):
    """Stage 3 on a random VAE at 32 px: one cache for both runs, the second run continues at step 6, and the
    decoder's loss on the same 4 clips falls."""
    from framepack_rt.pipeline.fast_decoder import load_fast_decoder

    with pytest.raises(FileNotFoundError, match="no VAE"):
        _decoder_stage(tmp_path, 1)
    torch.manual_seed(0)
    T.build_vae().save_pretrained(tmp_path / "vae")
    first = _decoder_stage(tmp_path, 5)
    log = _decoder_stage(tmp_path, 40)
    steps = [r["step"] for r in log if "step" in r]
    assert steps[:6] == [1, 2, 3, 4, 5, 6] and steps[-1] == 40 and len(first) == 6
    assert sum("cached_clips" in r for r in log) == 1
    losses = [r["loss"] for r in log if "step" in r]
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    decoder = load_fast_decoder(tmp_path / "fast_decoder")
    assert decoder.spatial_compression_ratio == 8 and list(decoder.config.block_out_channels) == [16, 8, 8, 8]
    assert decoder.config.trained_latent_size == 4  # 32 px clips through the 8x VAE: what the pipeline checks at load
    # export adds just this part to a model set (fp16, as the set ships)
    T.export(T.parser().parse_args(["export", "--out", str(tmp_path), "--to", str(tmp_path / "set")]))
    shipped = load_fast_decoder(tmp_path / "set" / "fast_decoder")
    assert sorted(p.name for p in (tmp_path / "set").iterdir()) == ["fast_decoder"]
    assert all(torch.equal(a.half().float(), b) for a, b in zip(decoder.parameters(), shipped.parameters()))
    # ... only into a set whose VAE it was trained for
    torch.manual_seed(1)
    T.build_vae().save_pretrained(tmp_path / "other_set" / "vae")
    with pytest.raises(ValueError, match="not the VAE of"):
        T.export(T.parser().parse_args(["export", "--out", str(tmp_path), "--to", str(tmp_path / "other_set")]))
    # a new VAE in OUT/vae: the latent cache is encoded again
    shutil.rmtree(tmp_path / "vae")
    shutil.copytree(tmp_path / "other_set" / "vae", tmp_path / "vae")
    log = _decoder_stage(tmp_path, 41)
    assert [r.get("cache") for r in log].count("stale, rebuilt") == 1


def test_decoder_stage_draws_frames_larger_than_the_vae(tmp_path):
    """--decoder-scale 2: the targets are the clips rendered at twice the side (the 32 px clips' 2x2 means are
    the 32 px clips), widths need one more entry, and --decoder-init starts from a 1x decoder's matching layers."""
    from framepack_rt.demo.train_decoder import clip_pixels, init_matching
    from framepack_rt.demo.world import WorldConfig
    from framepack_rt.pipeline.fast_decoder import FastVideoDecoder, load_fast_decoder

    small, _ = clip_pixels([5, 9], 2, WorldConfig(size=32))
    large, fg = clip_pixels([5, 9], 2, WorldConfig(size=32), scale=2)
    assert large.shape[-2:] == (64, 64) and fg.shape[-2:] == (64, 64)
    assert (torch.nn.functional.avg_pool3d(large, (1, 2, 2)) - small).abs().mean() < 2e-3
    torch.manual_seed(0)
    T.build_vae().save_pretrained(tmp_path / "vae")
    one_x = FastVideoDecoder(block_out_channels=(16, 8, 8, 8))
    one_x.save_pretrained(tmp_path / "one_x")
    two_x = FastVideoDecoder(block_out_channels=(16, 8, 8, 8, 4))
    copied = init_matching(two_x, tmp_path / "one_x")  # all but the output layer's kernel (its input width differs)
    assert sorted(copied) == sorted(k for k in one_x.state_dict() if k != "conv_out.weight")
    assert all(torch.equal(two_x.state_dict()[k], one_x.state_dict()[k]) for k in copied)
    with pytest.raises(ValueError, match="upsamples 8x.*--decoder-scale is 2: give 5 widths"):
        _decoder_stage(tmp_path, 1, "--decoder-scale", "2")
    log = _decoder_stage(tmp_path, 3, "--decoder-scale", "2", "--decoder-widths", "16,8,8,8,8",
                         "--decoder-init", str(tmp_path / "one_x"))
    assert [r["step"] for r in log if "step" in r] == [1, 2, 3]
    decoder = load_fast_decoder(tmp_path / "fast_decoder")
    assert decoder.spatial_compression_ratio == 16
    with torch.no_grad():
        assert decoder(torch.randn(1, 16, 2, 2, 3)).shape == (1, 3, 5, 32, 48)


def test_decoder_stage_grows_a_flow_head_onto_a_trained_decoder(tmp_path):
    """--decoder-flow --decoder-init: the first step's loss is the init decoder's (the zero flow head changes
    nothing), the head learns from there, and the exported folder loads with it."""
    from framepack_rt.pipeline.fast_decoder import FastVideoDecoder, load_fast_decoder

    torch.manual_seed(0)
    FastVideoDecoder(block_out_channels=(16, 8, 8, 8)).save_pretrained(tmp_path / "init")
    T.build_vae().save_pretrained(tmp_path / "vae")
    first_losses = []
    for name, more in (("plain", ()), ("flow", ("--decoder-flow",))):
        shutil.copytree(tmp_path / "vae", tmp_path / name / "vae")
        log = _decoder_stage(tmp_path / name, 3, "--decoder-init", str(tmp_path / "init"), *more)
        first_losses.append(next(r["loss"] for r in log if r.get("step") == 1))
    assert first_losses[0] == pytest.approx(first_losses[1], rel=1e-5)
    decoder = load_fast_decoder(tmp_path / "flow" / "fast_decoder")
    assert decoder.config.motion_flow and decoder.flow_head[2].weight.abs().sum() > 0


def test_centroid_steps_tell_a_latent_at_a_time_from_frame_by_frame_motion():
    from framepack_rt.demo.train_decoder import centroid_steps, centroids

    frames = np.zeros((9, 16, 16, 3), np.uint8)  # frame 0, then latents 1 and 2 (frames 1-4, 5-8)
    for f in range(9):
        frames[f, 6:9, f : f + 3] = 200  # a square one pixel further right each frame
    smooth = centroids(frames, (0, 0, 0))
    assert np.allclose(np.diff(smooth[:, 0]), 1) and np.allclose(smooth[:, 1], 7)
    held = smooth.copy()
    held[1:5], held[5:9] = smooth[2], smooth[6]  # a latent's frames alike, at its middle
    assert centroid_steps([smooth]) == {"within": 1.0, "across": 1.0, "largest": 1.0}
    assert centroid_steps([held, held]) == {"within": 0.0, "across": 3.0, "largest": 4.0}  # steps 2, then 4
    assert np.isnan(centroids(np.zeros((1, 4, 4, 3), np.uint8), (0, 0, 0))).all()
