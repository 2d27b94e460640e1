"""Train the demo model, or fine-tune the 13B: flow matching on FramePack F1 sections.

Demo, on a CPU (each stage resumes from its checkpoint in OUT when re-run):

    python -m framepack_rt.demo.train vae --out runs/demo            # stage 1: the VAE on world clips
    python -m framepack_rt.demo.train encode --out runs/demo         # clips -> latent cache (runs/demo/latents.pt)
    python -m framepack_rt.demo.train transformer --out runs/demo    # stage 2: the transformer
    python -m framepack_rt.demo.train decoder --out runs/demo        # stage 3: the fast decoder (train_decoder.py)
    python -m framepack_rt.demo.train export --out runs/demo         # fp16 weights -> framepack_rt/demo/weights
    python -m framepack_rt.demo.train all --out runs/demo            # the five in a row

The shipped weights were made on the 2-core CPU with exactly these (README gives the times and results):

    python -m framepack_rt.demo.train vae --out runs/vae0 --vae-steps 4000 --vae-batch 4   # see below
    python -m framepack_rt.demo.train vae --out runs/vae1 --vae-init runs/vae0/vae --vae-steps 1500 --vae-lr 5e-4
    python -m framepack_rt.demo.train vae --out runs/vae2 --vae-init runs/vae1/vae --vae-steps 2500 --vae-lr 4e-4
    for s in 1 2; do mkdir -p runs/c$s && ln -sfn ../vae2/vae runs/c$s/vae; done      # two caches, in parallel:
    OMP_NUM_THREADS=1 python -m framepack_rt.demo.train encode --out runs/c1 --seed 1 --clips 2000 --clip-latents 24 &
    OMP_NUM_THREADS=1 python -m framepack_rt.demo.train encode --out runs/c2 --seed 2 --clips 2000 --clip-latents 24
    mkdir -p runs/tr && ln -sfn ../vae2/vae runs/tr/vae
    python -m framepack_rt.demo.train transformer --out runs/tr --cache runs/c1/latents.pt runs/c2/latents.pt \
        --steps 15000 --save-every 1000
    mkdir -p runs/tr2 && ln -sfn ../vae2/vae runs/tr2/vae   # continue with 10% text dropout, for real CFG:
    python -m framepack_rt.demo.train transformer --out runs/tr2 --init runs/tr/transformer \
        --cache runs/c1/latents.pt runs/c2/latents.pt --steps 6000 --lr 2e-4 --warmup 100 --text-dropout 0.1
    python -m framepack_rt.demo.train export --out runs/tr2     # (the transformer shipped until the rounds below)
    mkdir -p runs/fd64 && ln -sfn "$PWD/framepack_rt/demo/weights/vae" runs/fd64/vae   # stage 3, for that VAE:
    python -m framepack_rt.demo.train decoder --out runs/fd64 --decoder-steps 3000 --save-every 250
    python -m framepack_rt.demo.train export --out runs/fd64      # (the 64 px fast decoder, shipped until 128 px)
    mkdir -p runs/fd128 && ln -sfn "$PWD/framepack_rt/demo/weights/vae" runs/fd128/vae  # 128 px frames, same latents:
    python -m framepack_rt.demo.train decoder --out runs/fd128 --decoder-scale 2 --decoder-widths 64,32,16,16,16 \
        --decoder-init runs/fd64/fast_decoder --decoder-steps 2000 --save-every 200
    python -m framepack_rt.demo.train export --out runs/fd128     # the 128 px fast decoder, shipped until the flow
    mkdir -p runs/fdflow && ln -sfn "$PWD/framepack_rt/demo/weights/vae" runs/fdflow/vae  # frames that move within a latent:
    for n in 1000 2000; do python -m framepack_rt.demo.train decoder --out runs/fdflow --decoder-scale 2 \
        --decoder-widths 64,32,16,16,16 --decoder-init runs/fd128/fast_decoder --decoder-flow --decoder-lr 1e-3 \
        --decoder-steps $n --save-every 100; done                 # (it ran as 1000 steps, then resumed to 2000)
    python -m framepack_rt.demo.train export --out runs/fdflow    # the shipped fast_decoder/
    # Then three DAgger rounds for the transformer (demo/onpolicy.py), with that decoder: record wall-turn scenes
    # from the current weights with the world as the expert, then fine-tune on the caches plus every recording so far.
    # (The recordings sampled with DEMO_CFG_AFTER_CHANGE = 4, the setting then; it is 2.5 since.)
    dagger_round() {  # K, weights to record from, transformer to start from, steps, lr, scenes, on-policy
      k=$1 model=$2 init=$3 steps=$4 lr=$5 scenes=$6 fraction=$7 a=$8 b=$9; shift 9  # fraction, two caches, seeds
      for s in "$@"; do OMP_NUM_THREADS=1 python -m framepack_rt.demo.onpolicy --model $model --out runs/op/one$s.pt \
          --seed $s --scenes $scenes --wall-turns --one-object --only-found & done; wait
      mkdir -p runs/r$k && ln -sfn "$PWD/framepack_rt/demo/weights/vae" runs/r$k/vae
      python -m framepack_rt.demo.train transformer --out runs/r$k --init $init --cache runs/$a/latents.pt \
          runs/$b/latents.pt --onpolicy runs/op/one*.pt --onpolicy-fraction $fraction --steps $steps --lr $lr \
          --warmup 100 --text-dropout 0.1 --save-every 500
      cp -r framepack_rt/demo/weights runs/r${k}w && python -m framepack_rt.demo.train export --out runs/r$k --to runs/r${k}w
    }
    dagger_round 1 framepack_rt/demo/weights framepack_rt/demo/weights/transformer 2500 2e-4 250 0.5 c1 c2 13 14
    dagger_round 2 runs/r1w runs/r1/transformer 2000 1e-4 200 0.5 c1 c2 15 16
    dagger_round 3 runs/r2w runs/r2/transformer 2000 1e-4 200 0.5 c1 c2 17 18
    cp runs/r3w/transformer/* framepack_rt/demo/weights/transformer/     # shipped at stop 38
    # Stop 39: two fresh caches of 1000 clips, the second with prompt changes that turn the subject back, and a
    # fourth DAgger round on them, recorded from the stop-38 weights (TRAINING.md: a fifth was tried, not shipped).
    for s in 1 7; do mkdir -p runs/d$s && ln -sfn "$PWD/framepack_rt/demo/weights/vae" runs/d$s/vae; done
    OMP_NUM_THREADS=1 python -m framepack_rt.demo.train encode --out runs/d1 --seed 1 --clips 1000 --clip-latents 24 &
    OMP_NUM_THREADS=1 python -m framepack_rt.demo.train encode --out runs/d7 --seed 7 --clips 1000 --clip-latents 24 \
        --turn-rate 0.5; wait
    rm runs/op/*.pt   # the rounds' windows above were made from older weights: this stop starts afresh
    dagger_round 4 runs/r3w runs/r3w/transformer 3000 2e-4 200 0.4 d1 d7 21 22
    cp runs/r4w/transformer/* framepack_rt/demo/weights/transformer/     # shipped at stop 39, until 96 px
    # Stops 42-47: the same VAE at 96 px (12x12 latents). W64 is the 64 px set above (framepack_rt/demo/weights
    # at commit 5cee3c0); each hN is a fine-tune from h(N-1) and hNw its set (W64 with hN's transformer).
    W64=runs/ship64w; for s in 1 7; do mkdir -p runs/e$s && ln -sfn "$PWD/$W64/vae" runs/e$s/vae; done
    OMP_NUM_THREADS=1 python -m framepack_rt.demo.train encode --out runs/e1 --seed 1 --clips 1000 --clip-latents 24 \
        --size 96 & OMP_NUM_THREADS=1 python -m framepack_rt.demo.train encode --out runs/e7 --seed 7 --clips 1000 \
        --clip-latents 24 --size 96 --turn-rate 0.5; wait
    hround() {  # name, transformer to start from, steps, lr, on-policy fraction, recordings...
      n=$1 init=$2 steps=$3 lr=$4 fraction=$5; shift 5; mkdir -p runs/$n && ln -sfn "$PWD/$W64/vae" runs/$n/vae
      op=(); [ $# -gt 0 ] && op=(--onpolicy "$@" --onpolicy-fraction $fraction)
      python -m framepack_rt.demo.train transformer --out runs/$n --init $init --cache runs/e1/latents.pt \
          runs/e7/latents.pt "${op[@]}" --steps $steps --lr $lr --warmup 100 --text-dropout 0.1 --save-every 250
      cp -r $W64 runs/${n}w && python -m framepack_rt.demo.train export --out runs/$n --to runs/${n}w
    }
    record() {  # set to record from, then seed:scenes pairs (two one-thread processes); BG=dark,green: only those
      m=$1; shift; mkdir -p runs/op96
      for a in "$@"; do OMP_NUM_THREADS=1 python -m framepack_rt.demo.onpolicy --model $m --size 96 --seed ${a%:*} \
          --out runs/op96/one${a%:*}.pt --scenes ${a#*:} --wall-turns --one-object --only-found \
          ${BG:+--backgrounds $BG} & done; wait
    }
    hround h1 $W64/transformer 3000 2e-4 0
    record runs/h1w 31:120 32:120; hround h2 runs/h1/transformer 1500 1e-4 0.4 runs/op96/one3[1-2].pt
    record runs/h2w 33:90 34:100;  hround h3 runs/h2/transformer 1500 1e-4 0.4 runs/op96/one3[1-4].pt
    record runs/h3w 35:150 36:150; hround h4 runs/h3/transformer 2000 1e-4 0.4 runs/op96/one3[1-6].pt
    record runs/h4w 37:150 38:150; hround h5 runs/h4/transformer 2000 1e-4 0.4 runs/op96/one3[1-8].pt
    hround h6 runs/h5/transformer 4000 2e-4 0.2 runs/op96/one3[1-8].pt                 # more world steps
    mkdir -p runs/fd96 && ln -sfn "$PWD/$W64/vae" runs/fd96/vae   # the fast decoder fine-tuned at 96 px:
    OMP_NUM_THREADS=1 python -m framepack_rt.demo.train decoder --out runs/fd96 --size 96 --decoder-scale 2 \
        --decoder-widths 64,32,16,16,16 --decoder-init $W64/fast_decoder --decoder-flow --decoder-lr 5e-4 \
        --decoder-steps 400 --save-every 100
    fd96() { rm -r runs/$1/fast_decoder && cp -r runs/fd96/fast_decoder runs/$1/; }  # fp32, as trained
    fd96 h6w; record runs/h6w 39:120 40:120     # from here on the sets record through the 96 px decoder
    hround h7 runs/h6/transformer 2000 1e-4 0.4 runs/op96/one3[1-9].pt runs/op96/one40.pt
    fd96 h7w; record runs/h7w 41:120 42:120
    hround h8 runs/h7/transformer 2000 1e-4 0.4 runs/op96/one3[1-9].pt runs/op96/one4[0-2].pt
    fd96 h8w; record runs/h8w 43:120 44:120
    hround h9 runs/h8/transformer 2000 1e-4 0.4 runs/op96/one3[1-9].pt runs/op96/one4[0-4].pt
    fd96 h9w; record runs/h9w 45:120 46:120
    hround h10 runs/h9/transformer 2000 1e-4 0.4 runs/op96/one3[1-9].pt runs/op96/one4[0-6].pt
    fd96 h10w; record runs/h10w 47:120 48:120
    hround h11 runs/h10/transformer 2000 1e-4 0.4 runs/op96/one3[1-9].pt runs/op96/one4[0-8].pt
    fd96 h11w; record runs/h11w 49:120 50:120
    hround h12 runs/h11/transformer 2000 1e-4 0.4 runs/op96/one3[1-9].pt runs/op96/one4[0-9].pt runs/op96/one50.pt
    fd96 h12w; BG=dark,green record runs/h12w 51:120 52:120   # the two weakest backgrounds only
    hround h13 runs/h12/transformer 2000 1e-4 0.4 runs/op96/one3[1-9].pt runs/op96/one4[0-9].pt runs/op96/one5[0-2].pt
    python -m framepack_rt.demo.train export --out runs/h13 && python -m framepack_rt.demo.train export --out runs/fd96
    # ^ the shipped transformer/ (stop 49), fast_decoder/ (stop 47) and example/ at 96 px

A transformer grown to twice the depth from the shipped one (``--init ... --deepen 6,6``: demo/grow.py, the same
function at first) was trained and measured, not shipped; TRAINING.md has the command and the figures.
So were fine-tunes on caches of longer clips (``encode --clip-latents 60``) and of clips whose prompt changes
often turn the subject back (``--turn-rate 0.5``, world.WorldConfig.turn_rate): TRAINING.md has those too.
So was error recycling (``--error-recycling P``, demo/recycling.py): TRAINING.md's fifth-round fine-tune with the
model's own banked one-step errors added to a fraction P of the histories, which changed nothing measurable.
So were caches whose walls stop objects partly outside the frame (``encode --world-margin -0.05``), against the
red ball that turns blue where the model presses it into the wall, and an object-weighted loss (commit 9527f67,
reverted): TRAINING.md has both.
The 96 px runs above are shipped since stop 47, h13 since stop 49 (TRAINING.md has each round's figures). The
64 px fast decoder draws a red ball orange on grey backgrounds from 12x12 latents, hence fd96; on the 64 px
transformer's latents fd96 is worse than the decoder it started from.

The 128 px run started from the 64 px decoder as exported (fp16, framepack_rt/demo/weights/fast_decoder at
commit d8802fc); runs/fd64/fast_decoder holds the same weights in fp32. The flow run started from the 128 px
decoder as exported (framepack_rt/demo/weights/fast_decoder at commit 4570a7e).

The first VAE run ran before commit 0a10d24, when models.VAE_CONFIG had norm_num_groups=4: with 2 channels
a group a plain frame normalises to a sign pattern, and plain backgrounds decoded to one colour. The next two
runs continue its weights with one group (the parameter shapes are the same). Training a one-group VAE from
scratch for the same 8000 steps was not tried. Seeds 1 and 2 keep the training scenes apart
from the evaluation's (seeds 0-49).

What changed from the earlier run whose weights failed the evaluation (1240 clips, README has its figures):
4000 clips instead of 1240 (that run continued its training scenes but dissolved new ones), the one-group
VAE, the motion-weighted loss (--motion-weight: most positions are static background) and a little noise on
the context history (--history-noise: at sampling time the history is the model's own output).

The second transformer run (--text-dropout 0.1: a tenth of the samples see zero text, the engine's default
negative prompt) gives the model an unconditional branch, so the demo can sample with real classifier-free
guidance (demo.DEMO_CFG). Guiding the first run's weights against zero text, which they never saw, raised the
pass rates but turned the red ball yellow; with the trained branch, and guidance on the noisy steps only
(demo.DEMO_CFG_MIN_SIGMA), the added colour error is about half as large (TRAINING.md has both).

Stage 2 samples one section per example from the cached clips: the target is a window of w latents, the
context is the start latent and the 19 latents before the window packed as the F1 stream packs them
(data.pack_context; zeros before the clip start); the text is the prompt in force for the window, the image
embedding is the clip's first frame's. x_sigma = (1 - sigma) x0 + sigma noise, the model predicts
v = noise - x0 at timestep 1000 sigma, sigma drawn uniformly then moved by the same resolution shift the
sampler uses (sampling.flow_shift). A fraction of batches use the vanilla layout (no start slot), so the
same model also runs the vanilla schedule the drift evaluation compares against.

Fine-tuning the 13B on an 8-GPU node (FSDP, one unit per block, bf16 compute, fp32 master weights):

    torchrun --standalone --nproc_per_node 8 -m framepack_rt.demo.train transformer --fsdp \\
        --init /models/FramePack_F1_I2V_HY_20250503 --cache /data/cache/*.pt --out runs/f1-ft \\
        --batch 1 --lr 1e-5 --warmup 100 --steps 2000 --bf16 --grad-checkpoint --save-every 200

Only rank 0 reads the checkpoint (fp32 in host memory: about 52 GB); the other ranks build the model on the
meta device and receive the weights unit by unit (sync_module_states; CUDA only: on the CPU every rank reads
the folder). The caches are LatentCache files written by data.encode_clip / data.encode_prompts with the 13B
parts (framepack_rt.pipeline.parts.FolderParts) on your videos and prompt timelines. Every rank draws its own windows
through a DistributedSampler; checkpoints are torch.distributed.checkpoint folders (each rank writes its
shards) and resume with the same command. No EMA under FSDP (it would need a full copy per rank); ``export``
is not needed there: OUT/transformer is written in the diffusers layout at the end.

``--accumulate A`` takes A micro-batches per step and rank, micro-batch i drawn (windows and noise) as rank
``rank * A + i`` of ``world * A`` would draw it: one process with ``--accumulate 2`` takes the steps two FSDP
ranks take. tests/demo/test_train.py checks exactly that at world size 2 on gloo (torchrun, 2 steps, sharded
save, resume, a third step): max |weight diff| 2.2e-6 against one process, with the weights moved 1.3e-3.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import time
from pathlib import Path

import numpy as np
import torch

from framepack_rt.demo import WEIGHTS_DIR
from framepack_rt.demo import dist as D
from framepack_rt.demo.data import (
    LatentCache,
    WindowDataset,
    collate,
    encode_clip,
    encode_prompts,
    latent_slots,
    pack_context,
)
from framepack_rt.demo.models import (
    DEMO_SIZE,
    ENCODER_SEED,
    TRANSFORMER_CONFIG,
    InMemoryParts,
    build_demo_models,
    build_vae,
)
from framepack_rt.demo.recycling import ErrorBank
from framepack_rt.demo.train_decoder import clip_pixels
from framepack_rt.demo.world import (LATENT_FRAMES, WorldConfig, all_prompts, frames_for_latents, latent_of_frame,
                                     make_clip)
from framepack_rt.engine.sampling import flow_seq_len, flow_shift
from framepack_rt.engine.schedules import f1_layout, vanilla_layout

DISTILLED_GUIDANCE = 10.0  # the sampler's default embedded guidance (GuidanceConfig.distilled): trained at it


def over_budget(args: argparse.Namespace, began: float, info: D.DistInfo | None = None) -> bool:
    """--time-budget seconds spent (0: no budget). The stage then checkpoints and finishes normally, so a
    later run with the same command continues where this one stopped. Rank 0's clock decides for all ranks."""
    if not args.time_budget:
        return False
    over = time.perf_counter() - began > args.time_budget
    if info is not None and info.distributed:
        flag = torch.tensor([float(over)], device=info.device)
        torch.distributed.broadcast(flag, src=0)
        over = bool(flag.item())
    return over


def learning_rate(step: int, base: float, warmup: int, total: int, floor: float) -> float:
    """Linear warmup over ``warmup`` steps, then a cosine from ``base`` down to ``floor * base`` at ``total``.

    The decay matters on a short budget: the last few hundred steps at a small rate take most of the noise out
    of the weights (the demo VAE's reconstruction error roughly halves over them).
    """
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (floor + (1.0 - floor) * 0.5 * (1.0 + np.cos(np.pi * progress)))


class StageSteps:
    """What the VAE's and the fast decoder's loops share: one optimizer step on a loss, its log line every
    ``--log-every`` steps (and at the first step of a run), a checkpoint every ``--save-every`` steps and at the
    end. (The transformer's loop has micro-batches, EMA and FSDP: its own.)"""

    def __init__(self, stage: str, model: torch.nn.Module, opt: torch.optim.Optimizer, out: Path,
                 args: argparse.Namespace, total: int, first: int, info: D.DistInfo) -> None:
        self.stage, self.model, self.opt, self.args, self.total, self.first, self.info = (
            stage, model, opt, args, total, first, info)
        self.ckpt, self.log, self.began = out / f"{stage}_ckpt", out / f"{stage}_log.jsonl", time.perf_counter()

    def checkpoint(self, step: int) -> None:
        D.save_checkpoint(self.ckpt, self.model, self.opt, {"step": step}, self.info)

    def start(self, step: int, lr: float, floor: float) -> bool:
        """Before ``step``: the learning rate (50 warm-up steps, cosine to ``floor * lr``), or False after a
        checkpoint when --time-budget is spent (the same command then resumes)."""
        if over_budget(self.args, self.began):
            self.checkpoint(step)
            return False
        for group in self.opt.param_groups:
            group["lr"] = learning_rate(step, lr, 50, self.total, floor)
        return True

    def take(self, step: int, loss: torch.Tensor, parts: dict) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        if (step + 1) % self.args.log_every == 0 or step == self.first:
            D.log_line(self.log, {"stage": self.stage, "step": step + 1, "loss": loss.item(), **parts,
                                  "grad_norm": float(norm), "s": round(time.perf_counter() - self.began, 1)}, self.info)
        if (step + 1) % self.args.save_every == 0 or step + 1 == self.total:
            self.checkpoint(step + 1)


# ------------------------------------------------------------------------------------------------ stage 1: VAE
def vae_batch(rng: np.random.Generator, batch: int, frames: int, cfg: WorldConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Random world clips of ``frames`` (4 N - 3) frames -> pixels (B, 3, T, H, W) in [-1, 1] and a foreground
    mask (B, 1, T, H, W): train_decoder.clip_pixels on seeds drawn from ``rng``."""
    if frames < 1 or (frames + 3) % LATENT_FRAMES:
        raise ValueError(f"a VAE training clip has 4 N - 3 frames (1, 5, 9, ...), got {frames}: pass --frames so")
    return clip_pixels([int(rng.integers(2**31)) for _ in range(batch)], latent_of_frame(frames - 1) + 1, cfg)


def vae_loss(vae: torch.nn.Module, pixels: torch.Tensor, fg: torch.Tensor, kl_weight: float,
             fg_weight: float) -> tuple[torch.Tensor, dict]:
    """L1 + MSE reconstruction, weighted up on the shapes (they are a few % of the pixels), plus a small KL."""
    posterior = vae.encode(pixels).latent_dist
    recon = vae.decode(posterior.sample()).sample
    weight = 1.0 + fg_weight * fg
    err = recon - pixels
    rec = (weight * (err.abs() + err.pow(2))).mean() / weight.mean()
    # KL per latent element (diffusers' kl() sums over dims 1-3 only, which is wrong for 5-D latents).
    kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).mean()
    return rec + kl_weight * kl, {"rec": rec.item(), "kl": kl.item(), "mse": err.pow(2).mean().item()}


def train_vae(args: argparse.Namespace) -> Path:
    """Stage 1. Writes OUT/vae (diffusers layout, scaling_factor measured) and OUT/vae_ckpt (resumable)."""
    out, info = Path(args.out), D.DistInfo()
    cfg = WorldConfig(size=args.size)
    torch.manual_seed(args.seed)
    vae = build_vae().train()  # native Conv3d here: its backward is faster than the tap path's (0.29 vs 0.44 s)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    extra = D.load_checkpoint(out / "vae_ckpt", vae, opt, info)
    if extra is None and args.vae_init:  # a fresh run that starts from another VAE's weights (same shapes)
        from diffusers import AutoencoderKLHunyuanVideo

        vae.load_state_dict(AutoencoderKLHunyuanVideo.from_pretrained(args.vae_init).state_dict())
    extra = extra or {"step": 0}
    steps = StageSteps("vae", vae, opt, out, args, args.steps, extra["step"], info)
    for step in range(extra["step"], args.steps):
        if not steps.start(step, args.lr, args.lr_floor):
            break
        rng = np.random.default_rng([args.seed, step])  # batches depend on (seed, step) only: resumable
        pixels, fg = vae_batch(rng, args.batch, args.frames, cfg)
        steps.take(step, *vae_loss(vae, pixels, fg, args.kl, args.fg_weight))
    vae.eval()
    scale = measure_scaling_factor(vae, cfg, args.seed)
    vae.register_to_config(scaling_factor=scale)
    vae.save_pretrained(out / "vae")
    D.log_line(steps.log, {"stage": "vae", "done": True, "scaling_factor": scale}, info)
    return out / "vae"


@torch.no_grad()
def measure_scaling_factor(vae: torch.nn.Module, cfg: WorldConfig, seed: int, clips: int = 12) -> float:
    """1 / std of the posterior means over fresh clips: the transformer then sees unit-scale latents."""
    rng = np.random.default_rng([seed, 10**9])
    pixels, _ = vae_batch(rng, clips, 5, cfg)
    return float(1.0 / vae.encode(pixels).latent_dist.mode().std())


# ------------------------------------------------------------------------------------------ stage 2a: encode
def encode_world(args: argparse.Namespace) -> Path:
    """World clips -> OUT/latents.pt with the trained VAE and the demo's (frozen) encoders."""
    from diffusers import AutoencoderKLHunyuanVideo

    from framepack_rt.pipeline.cpu_conv import use_tap_convs

    out = Path(args.out)
    models = build_demo_models(ENCODER_SEED)  # the encoders the shipped set will hold, whatever --seed is
    models.vae = AutoencoderKLHunyuanVideo.from_pretrained(out / "vae")
    use_tap_convs(models.vae.encoder)  # CPU Conv3d is slow_conv3d: conv2d taps are several times faster
    parts = InMemoryParts(models)
    cfg = WorldConfig(size=args.size, turn_rate=args.turn_rate, margin=args.world_margin)
    cache = LatentCache(prompts=encode_prompts(parts, all_prompts()))
    began = time.perf_counter()
    for i in range(args.clips):
        clip = make_clip(args.seed * 1_000_003 + i, frames_for_latents(args.clip_latents), cfg)
        prompts = [clip.prompt_at_latent(j) for j in range(clip.num_latents)]
        cache.clips.append(encode_clip(parts, clip.frames, prompts))
        if (i + 1) % 10 == 0:
            print(f"encoded {i + 1}/{args.clips} clips, {time.perf_counter() - began:.0f} s", flush=True)
    cache.save(out / "latents.pt")
    return out / "latents.pt"


# ------------------------------------------------------------------------------------- stage 2b: transformer
def motion_weights(target: torch.Tensor, start: torch.Tensor, history: torch.Tensor, strength: float,
                   scale: float = 0.5) -> torch.Tensor:
    """Per-position loss weights (B, 1, w, h, w): 1 + strength where the window differs from the latent before it.

    target (B, C, w, h, w); start (B, C, 1, h, w); history (B, C, K, h, w), all-zero before the clip start (the
    first section then compares with the start latent). The difference is RMS over channels, ``scale`` (latents
    are unit-scale: about the 90th percentile of world windows) counts as fully moving, and a 3x3 max-pool
    widens it by one latent pixel. Why: the moving object is a few % of the positions, so a plain MSE is
    spent on copying a static background, and an under-fitted model smears the one thing the prompt is about.
    """
    prev = history[:, :, -1:]
    prev = torch.where(latent_slots(prev), prev, start)  # an empty slot: the window starts the clip
    change = (target - prev).pow(2).mean(dim=1, keepdim=True).sqrt()
    moving = torch.nn.functional.max_pool3d((change / scale).clamp(max=1.0), (1, 3, 3), stride=1, padding=(0, 1, 1))
    return 1.0 + strength * moving


def noisy_history(history: torch.Tensor, max_std: float, generator: torch.Generator) -> torch.Tensor:
    """history (B, C, K, h, w) plus Gaussian noise of a per-sample std drawn uniformly in [0, max_std].

    At inference the history is the model's own earlier output, never quite a clean encode; training on
    slightly corrupted histories keeps one imperfect section from derailing the next (exposure bias). The
    all-zero slots before a clip's start stay exactly zero: the stream holds exact zeros there too.
    """
    if not max_std:
        return history
    b = history.shape[0]
    std = torch.rand(b, generator=generator).mul_(max_std).view(b, 1, 1, 1, 1)
    real = latent_slots(history)
    noise = torch.randn(history.shape, generator=generator)
    return history + (std * noise * real).to(history.device)


def flow_matching_loss(model: torch.nn.Module, batch: dict, layout, generator: torch.Generator,
                       shift: float, motion_weight: float = 0.0, history_noise: float = 0.0,
                       text_dropout: float = 0.0, bank: ErrorBank | None = None,
                       recycle: float = 0.0) -> torch.Tensor:
    """MSE between the predicted and the true velocity for one batch of windows, at random sigmas; with
    ``motion_weight`` > 0 the positions that change are weighted up (:func:`motion_weights`); with
    ``history_noise`` > 0 the context history is corrupted a little (:func:`noisy_history`); with
    ``text_dropout`` > 0 that fraction of samples sees zero text and pooled embeddings, the engine's default
    negative prompt, so that real classifier-free guidance has a trained unconditional branch; with a ``bank``
    the step's one-step errors are banked and ``recycle`` of the samples read a history with banked errors
    added (demo/recycling.py)."""
    device = next(model.parameters()).device
    x0 = batch["target"].to(device)
    b = x0.shape[0]
    u = torch.rand(b, generator=generator)
    sigma = (shift * u / (1 + (shift - 1) * u)).to(device)  # the sampler's shifted schedule, as a density
    noise = torch.randn(x0.shape, generator=generator).to(device)
    s = sigma.view(b, 1, 1, 1, 1)
    x = (1 - s) * x0 + s * noise
    start, history = batch["start"].to(device), batch["history"].to(device)
    read = noisy_history(history, history_noise, generator)
    if bank is not None:
        read = bank.corrupt(read, recycle, generator)
    context = pack_context(layout, start, read)
    keep = torch.ones(b, device=device)  # 0: this sample sees no text (drawn only when on: same noise otherwise)
    if text_dropout:
        keep = (torch.rand(b, generator=generator) >= text_dropout).float().to(device)
    v = model(
        hidden_states=x, timestep=sigma * 1000.0, guidance=torch.full((b,), DISTILLED_GUIDANCE * 1000.0, device=device),
        encoder_hidden_states=batch["text"].to(device) * keep.view(b, 1, 1),
        encoder_attention_mask=batch["text_mask"].to(device),
        pooled_projections=batch["pooled"].to(device) * keep.view(b, 1), image_embeds=batch["image_embeds"].to(device),
        **context.as_kwargs(),
    )
    if bank is not None:  # x_sigma - sigma v: the step's one-step guess of the clean window
        bank.put((x - s * v.detach()).float() - x0.float(), sigma)
    err = (v.float() - (noise - x0)).pow(2)
    if not motion_weight:
        return err.mean()
    weight = motion_weights(x0, start, history, motion_weight)  # what moves is judged on the clean history
    return (weight * err).mean() / weight.mean()


def batches(dataset: WindowDataset, prompts: dict, batch: int, info: D.DistInfo, seed: int, start_step: int):
    """Endless (step, batch) from a DistributedSampler: each rank its own windows, reshuffled every epoch."""
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=seed,
                                 drop_last=True)
    per_epoch = len(sampler) // batch
    if per_epoch == 0:
        raise ValueError(f"{len(sampler)} windows per rank cannot fill one batch of {batch}")
    step = start_step
    while True:
        epoch, offset = divmod(step, per_epoch)
        sampler.set_epoch(epoch)
        order = list(sampler)
        for i in range(offset, per_epoch):
            yield step, collate([dataset[j] for j in order[i * batch : (i + 1) * batch]], prompts)
            step += 1


def micro_batches(dataset: WindowDataset, prompts: dict, args: argparse.Namespace, info: D.DistInfo, start_step: int):
    """Endless (step, [(data rank, batch), ...]): ``--accumulate A`` micro-batches per step, micro-batch i drawn
    as rank ``info.rank * A + i`` of ``world * A`` ranks would draw it. The training noise is seeded by that data
    rank too, so one process with --accumulate 2 takes the same steps as two FSDP ranks (up to reduction order)."""
    accumulate = args.accumulate
    if accumulate < 1:
        raise ValueError(f"--accumulate {accumulate}: give 1 or more micro-batches per step")
    streams = [batches(dataset, prompts, args.batch, D.DistInfo(rank=info.rank * accumulate + i,
                                                                 world_size=info.world_size * accumulate),
                       args.seed, start_step) for i in range(accumulate)]
    for drawn in zip(*streams):
        yield drawn[0][0], [(info.rank * accumulate + i, batch) for i, (_, batch) in enumerate(drawn)]


def broadcasts_init(args: argparse.Namespace, info: D.DistInfo) -> bool:
    """Only rank 0 reads --init and FSDP broadcasts it (sync_module_states, which needs CUDA); on the CPU
    (gloo, tests) every rank reads the folder itself."""
    return args.fsdp and args.init is not None and info.device.type == "cuda"


def build_transformer(args: argparse.Namespace, info: D.DistInfo) -> torch.nn.Module:
    """The demo config from scratch, or ``--init`` (a diffusers folder, e.g. the 13B F1) to fine-tune."""
    from framepack_rt.model.config import FramePackConfig
    from framepack_rt.model.transformer import FramePackTransformer

    if args.init is None:
        if args.deepen:
            raise ValueError("--deepen grows a trained transformer: give it with --init FOLDER")
        cfg = TRANSFORMER_CONFIG
        if args.tiny:
            cfg = dataclasses.replace(FramePackConfig.preset("tiny"), text_embed_dim=TRANSFORMER_CONFIG.text_embed_dim,
                                      pooled_projection_dim=TRANSFORMER_CONFIG.pooled_projection_dim,
                                      image_proj_dim=TRANSFORMER_CONFIG.image_proj_dim)
        return FramePackTransformer.from_config(cfg, seed=args.seed)
    if args.deepen and args.fsdp:
        raise ValueError("--deepen grows the demo model in one process: not with --fsdp")
    if broadcasts_init(args, info) and not info.is_main:
        return FramePackTransformer.from_config(FramePackConfig.from_file(Path(args.init) / "config.json"),
                                                device="meta")
    model = FramePackTransformer.from_pretrained(args.init, dtype=torch.float32)
    if args.deepen:  # new zero-gated blocks between the trained ones: the same function, more depth (grow.py)
        from framepack_rt.demo.grow import deepen

        model = deepen(model, *args.deepen, seed=args.seed)
    return model


def wrap_for(model: torch.nn.Module, args: argparse.Namespace, info: D.DistInfo) -> torch.nn.Module:
    """FSDP with --fsdp; DDP when torchrun started several ranks without it; else just moved to the device."""
    if args.fsdp:
        return D.wrap_fsdp(model, info, bf16=args.bf16, sync_from_rank0=broadcasts_init(args, info))
    model = model.to(info.device)
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
    return model


def train_transformer(args: argparse.Namespace) -> Path:
    """Stage 2. Writes OUT/transformer (diffusers layout; the EMA weights when --ema) and OUT/transformer_ckpt."""
    from framepack_rt.kernels.dispatch import use_kernels

    if not 0.0 <= args.error_recycling <= 1.0:
        raise ValueError(f"--error-recycling {args.error_recycling}: give the fraction of samples, 0 to 1")
    if not 0.0 < args.error_max_sigma <= 1.0:
        raise ValueError(f"--error-max-sigma {args.error_max_sigma}: give a sigma in (0, 1]")
    info = D.setup(args.device, force=args.fsdp)
    out = Path(args.out)
    try:
        files = sorted(f for pattern in (args.cache or [str(out / "latents.pt")]) for f in glob.glob(pattern))
        if not files:
            raise FileNotFoundError(f"no latent cache found: {args.cache or out / 'latents.pt'}")
        cache = LatentCache.load(*files)
        dataset = WindowDataset(cache, window=args.window)
        if args.onpolicy:  # the model's own histories with the world's continuations (demo/onpolicy.py)
            from framepack_rt.demo.onpolicy import MixedDataset, OnPolicyDataset

            own = OnPolicyDataset.load(*args.onpolicy)
            cache.prompts.update(own.prompts)
            dataset = MixedDataset(dataset, own, args.onpolicy_fraction)
        model = wrap_for(build_transformer(args, info), args, info).train()
        inner = getattr(model, "module", model)  # the FramePackTransformer inside DDP (EMA reads its names)
        if args.grad_checkpoint:
            D.checkpoint_blocks(model)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)
        decay = args.ema if args.ema is not None else (0.0 if args.fsdp else 0.999)
        if decay and args.fsdp:
            raise ValueError("--ema keeps a full copy of the weights: not with --fsdp")
        ema = {k: v.detach().clone().float() for k, v in inner.state_dict().items()} if decay else None
        extra = D.load_checkpoint(out / "transformer_ckpt", model, opt, info) or {"step": 0}
        ema = extra.get("ema", ema)

        def checkpoint(step: int) -> None:
            D.save_checkpoint(out / "transformer_ckpt", model, opt, {"step": step, **({"ema": ema} if ema else {})},
                              info)

        bank = ErrorBank(window=args.window, max_sigma=args.error_max_sigma) if args.error_recycling else None
        h, w = cache.clips[0].latents.shape[-2:]
        shift = flow_shift(flow_seq_len(args.window, h, w))
        log, began = out / "transformer_log.jsonl", time.perf_counter()
        for step, micro in micro_batches(dataset, cache.prompts, args, info, extra["step"]):
            if step >= args.steps:
                break
            if over_budget(args, began, info):
                checkpoint(step)
                break
            lr = learning_rate(step, args.lr, args.warmup, args.steps, args.lr_floor)
            for group in opt.param_groups:
                group["lr"] = lr
            rng = np.random.default_rng([args.seed, step])  # the layout of a step is the same on every rank
            layout = vanilla_layout(args.window) if rng.random() < args.vanilla_fraction else f1_layout(args.window)
            autocast = torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=args.bf16 and not args.fsdp)
            opt.zero_grad(set_to_none=True)
            loss = 0.0
            for data_rank, batch in micro:  # gradients of the mean over micro-batches, as ranks average them
                seed = int(np.random.SeedSequence([args.seed, step, data_rank]).generate_state(1)[0])  # own noise
                with use_kernels(False), autocast:  # the Triton kernels are inference-only: torch ops for training
                    part = flow_matching_loss(model, batch, layout, torch.Generator().manual_seed(seed), shift,
                                              args.motion_weight, args.history_noise, args.text_dropout,
                                              bank, args.error_recycling) / len(micro)
                part.backward()
                loss = loss + part.detach()  # read on the host only when logged
            norm = D.clip_grad_norm(model, args.clip)
            opt.step()
            if ema is not None:
                with torch.no_grad():
                    for k, v in inner.state_dict().items():
                        ema[k].lerp_(v.float(), 1.0 - decay)
            if (step + 1) % args.log_every == 0 or step == extra["step"]:
                D.log_line(log, {"stage": "transformer", "step": step + 1, "loss": loss.item(),
                                 "layout": "f1" if layout.pattern.start_full_resolution else "vanilla",
                                 "grad_norm": float(norm), "lr": lr, "s": round(time.perf_counter() - began, 1)},
                           info)
            if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
                checkpoint(step + 1)
        save_transformer_folder(model, ema, out / "transformer", info)
    finally:
        if info.distributed:
            D.teardown()
    return out / "transformer"


def save_transformer_folder(model: torch.nn.Module, ema: dict | None, path: Path, info: D.DistInfo) -> None:
    """Diffusers-layout folder of the trained (or EMA) weights, written by the main rank."""
    from framepack_rt.model.transformer import FramePackTransformer

    state = ema if ema is not None else D.full_state_dict(model)
    if not info.is_main:
        return
    inner = getattr(model, "module", model)
    final = FramePackTransformer.from_config(inner.config, device="meta")
    final.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)
    final.save_pretrained(path)


# --------------------------------------------------------------------------------------------------- export
def export(args: argparse.Namespace) -> Path:
    """The demo set with the trained VAE and transformer (and fast decoder, when stage 3 ran), fp16, in the
    published layout (default WEIGHTS_DIR). A run with only a fast decoder (trained for a set's VAE, linked as
    OUT/vae) adds just that part to the target set."""
    from diffusers import AutoencoderKLHunyuanVideo

    from framepack_rt.demo.models import save_demo_models, save_part
    from framepack_rt.model.transformer import FramePackTransformer

    out = Path(args.out)
    target = Path(args.to) if args.to else WEIGHTS_DIR
    if not (out / "transformer").is_dir() and (out / "fast_decoder" / "config.json").is_file():
        from framepack_rt.demo.train_decoder import vae_fingerprint
        from framepack_rt.pipeline.fast_decoder import load_fast_decoder

        if (target / "vae").is_dir() and vae_fingerprint(out / "vae") != vae_fingerprint(target / "vae"):
            raise ValueError(f"{out / 'vae'} is not the VAE of {target}: this fast decoder was trained for another "
                             f"VAE. Train it against that set's VAE (ln -sfn {target / 'vae'} {out / 'vae'}, then "
                             "`train decoder` again)")

        size = save_part(load_fast_decoder(out / "fast_decoder"), target / "fast_decoder")
        print(f"wrote {target / 'fast_decoder'}: {size / 2**20:.2f} MiB")
        return target
    models = build_demo_models(ENCODER_SEED)
    models.vae = AutoencoderKLHunyuanVideo.from_pretrained(out / "vae")
    models.transformer = FramePackTransformer.from_pretrained(out / "transformer", dtype=torch.float32)
    if (out / "fast_decoder" / "config.json").is_file():  # stage 3, when it was run
        from framepack_rt.pipeline.fast_decoder import load_fast_decoder

        models.fast_decoder = load_fast_decoder(out / "fast_decoder")
    sizes = save_demo_models(models, target)
    total = sum(sizes.values())
    print(f"wrote {target}: {total / 2**20:.2f} MiB ({', '.join(f'{k} {v / 2**20:.2f}' for k, v in sizes.items())})")
    return target


# ------------------------------------------------------------------------------------------------------ CLI
def _block_counts(text: str) -> tuple[int, int]:
    """"D,S" -> (D, S): double- and single-stream block counts for --deepen."""
    try:
        double, single = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give two block counts, double- and single-stream, e.g. 6,6") from None
    if double < 1 or single < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: at least one double-stream block, no negative counts")
    return double, single


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m framepack_rt.demo.train", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="stage", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--out", required=True, help="run folder: checkpoints, logs, outputs")
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--size", type=int, default=DEMO_SIZE, help="world frame side in pixels")

    def vae_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--vae-steps", dest="vae_steps", type=int, default=6000)
        sp.add_argument("--vae-batch", dest="vae_batch", type=int, default=4)
        sp.add_argument("--frames", type=int, default=9, help="frames per VAE training clip (4N - 3)")
        sp.add_argument("--vae-lr", dest="vae_lr", type=float, default=1e-3)
        sp.add_argument("--vae-lr-floor", dest="vae_lr_floor", type=float, default=0.05,
                        help="final rate as a fraction of --vae-lr (cosine decay over --vae-steps)")
        sp.add_argument("--kl", type=float, default=1e-4, help="KL weight (per-element means)")
        sp.add_argument("--fg-weight", dest="fg_weight", type=float, default=10.0)
        sp.add_argument("--vae-init", dest="vae_init", default=None,
                        help="start from this VAE folder's weights (e.g. a run made with another norm grouping)")

    def encode_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--clips", type=int, default=600)
        sp.add_argument("--clip-latents", dest="clip_latents", type=int, default=60, help="latents per clip (8 s)")
        sp.add_argument("--turn-rate", dest="turn_rate", type=float, default=0.0, metavar="P",
                        help="chance that a prompt change turns its subject back (world.WorldConfig.turn_rate)")
        sp.add_argument("--world-margin", dest="world_margin", type=float, default=WorldConfig.margin, metavar="M",
                        help="objects stop this fraction of the side from the edge (world.WorldConfig.margin); "
                             "below 0 they stop partly outside the frame")

    def transformer_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--cache", nargs="*", help="latent cache files or globs (default OUT/latents.pt)")
        sp.add_argument("--steps", type=int, default=20000)
        sp.add_argument("--batch", type=int, default=8, help="per rank")
        sp.add_argument("--accumulate", type=int, default=1, metavar="A",
                        help="micro-batches of --batch per step and rank (gradient accumulation); one process "
                             "with A = N takes the steps N ranks take")
        sp.add_argument("--lr", type=float, default=5e-4)
        sp.add_argument("--warmup", type=int, default=500)
        sp.add_argument("--lr-floor", dest="lr_floor", type=float, default=0.05,
                        help="final rate as a fraction of --lr (cosine decay over --steps)")
        sp.add_argument("--weight-decay", dest="weight_decay", type=float, default=0.01)
        sp.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
        sp.add_argument("--window", type=int, default=9)
        sp.add_argument("--motion-weight", dest="motion_weight", type=float, default=4.0,
                        help="extra loss weight where the video changes (0: plain MSE)")
        sp.add_argument("--history-noise", dest="history_noise", type=float, default=0.15,
                        help="max std of the noise added to context history latents (0: clean history)")
        sp.add_argument("--text-dropout", dest="text_dropout", type=float, default=0.0,
                        help="fraction of samples trained without text (zero embeddings), for real CFG")
        sp.add_argument("--vanilla-fraction", dest="vanilla_fraction", type=float, default=0.15)
        sp.add_argument("--onpolicy", nargs="*", default=None,
                        help="windows files of demo/onpolicy.py: the model's own histories, the world's targets")
        sp.add_argument("--onpolicy-fraction", dest="onpolicy_fraction", type=float, default=0.5,
                        help="about this fraction of the windows drawn are on-policy ones")
        sp.add_argument("--error-recycling", dest="error_recycling", type=float, default=0.0, metavar="P",
                        help="fraction of samples whose history carries the model's own banked one-step errors "
                             "(demo/recycling.py; 0: off)")
        sp.add_argument("--error-max-sigma", dest="error_max_sigma", type=float, default=0.5, metavar="S",
                        help="bank the errors of training steps at sigma <= S only")
        sp.add_argument("--ema", type=float, default=None, help="EMA decay, 0: off (default 0.999; off with --fsdp)")
        sp.add_argument("--init", help="diffusers transformer folder to fine-tune (e.g. the 13B F1)")
        sp.add_argument("--deepen", type=_block_counts, default=None, metavar="D,S",
                        help="with --init: grow to D double- and S single-stream blocks, same function (grow.py)")
        sp.add_argument("--tiny", action="store_true", help="the tiny preset instead of the demo config (tests)")
        sp.add_argument("--fsdp", action="store_true", help="FullyShardedDataParallel over the torchrun group")
        sp.add_argument("--bf16", action="store_true", help="bf16 compute (autocast; FSDP mixed precision)")
        sp.add_argument("--grad-checkpoint", dest="grad_checkpoint", action="store_true")
        sp.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")

    from framepack_rt.demo.train_decoder import add_arguments as decoder_args

    for name, extra in (("vae", [vae_args]), ("encode", [encode_args]), ("transformer", [transformer_args]),
                        ("decoder", [decoder_args]), ("export", []),
                        ("all", [vae_args, encode_args, transformer_args, decoder_args])):
        sp = sub.add_parser(name)
        common(sp)
        for add in extra:
            add(sp)
        sp.add_argument("--log-every", dest="log_every", type=int, default=50)
        sp.add_argument("--time-budget", dest="time_budget", type=float, default=0.0,
                        help="seconds per training stage, then checkpoint and finish (0: none)")
        sp.add_argument("--save-every", dest="save_every", type=int, default=500)
        if name in ("export", "all"):
            sp.add_argument("--to", default=None, help=f"weights folder (default {WEIGHTS_DIR})")
    return p


def vae_stage_args(args: argparse.Namespace) -> argparse.Namespace:
    """The VAE stage reads steps / batch / lr: map --vae-steps / --vae-batch / --vae-lr onto them."""
    return argparse.Namespace(**{**vars(args), "steps": args.vae_steps, "batch": args.vae_batch, "lr": args.vae_lr,
                                 "lr_floor": args.vae_lr_floor})


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.stage in ("vae", "all"):
        train_vae(vae_stage_args(args))
    if args.stage in ("encode", "all"):
        encode_world(args)
    if args.stage in ("transformer", "all"):
        train_transformer(args)
    if args.stage in ("decoder", "all"):
        from framepack_rt.demo.train_decoder import train_decoder

        train_decoder(args)
    if args.stage in ("export", "all"):
        export(args)


if __name__ == "__main__":
    main()
