"""FramePackTransformer against diffusers' HunyuanVideoFramepackTransformer3DModel (the oracle)."""

from __future__ import annotations

import itertools

import pytest
import torch

from framepack_rt import FramePackConfig, FramePackTransformer

diffusers = pytest.importorskip("diffusers")


def diffusers_model(config: FramePackConfig):
    kwargs = {k: v for k, v in config.to_json_dict().items() if not k.startswith("_")}
    return diffusers.HunyuanVideoFramepackTransformer3DModel(**kwargs).eval()


@pytest.fixture
def pair(tiny_config):
    torch.manual_seed(0)
    ref = diffusers_model(tiny_config)
    ours = FramePackTransformer(tiny_config).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.mark.parametrize("layout", ["f1", "inverted"])
@pytest.mark.parametrize("text_lengths", [(10,), (10, 6), (3, 12, 1)], ids=["batch1", "batch2-ragged", "batch3-ragged"])
@torch.no_grad()
def test_matches_diffusers_fp32(pair, make_inputs, tiny_config, layout, text_lengths):
    ref, ours = pair
    kwargs = make_inputs(tiny_config, text_lengths=text_lengths, layout=layout)
    expected = ref(**kwargs).sample
    got = ours(**kwargs)
    assert got.shape == kwargs["hidden_states"].shape
    assert (got - expected).abs().max().item() <= 1e-5


@torch.no_grad()
def test_packed_batch_equals_samples_run_alone(pair, make_inputs, tiny_config):
    _, ours = pair
    kwargs = make_inputs(tiny_config, text_lengths=(10, 4))
    batched = ours(**kwargs)
    for i, n in enumerate((10, 4)):
        single = {k: v for k, v in kwargs.items()}
        for k in ("hidden_states", "encoder_hidden_states", "encoder_attention_mask", "pooled_projections",
                  "image_embeds", "latents_clean", "latents_history_2x", "latents_history_4x"):
            single[k] = kwargs[k][i : i + 1]
        single["encoder_hidden_states"] = single["encoder_hidden_states"][:, :n]
        single["encoder_attention_mask"] = None  # no padding left: None means all tokens are real
        single["timestep"], single["guidance"] = kwargs["timestep"][i], kwargs["guidance"][i]
        assert (ours(**single) - batched[i : i + 1]).abs().max().item() <= 1e-5


@torch.no_grad()
def test_bf16_error_within_torch_bf16_error(make_inputs):
    config = FramePackConfig.preset("tiny")  # our default fp32 output head on
    torch.manual_seed(0)
    ref = diffusers_model(config)
    ours = FramePackTransformer(config).eval()
    ours.load_state_dict(ref.state_dict())
    kwargs = make_inputs(config, text_lengths=(10, 6))
    truth = ref(**kwargs).sample
    ref_bf16, ours_bf16 = ref.to(torch.bfloat16), ours.to(torch.bfloat16)
    kwargs_bf16 = make_inputs(config, text_lengths=(10, 6), dtype=torch.bfloat16)
    torch_err = (ref_bf16(**kwargs_bf16).sample.float() - truth).abs().max().item()
    our_err = (ours_bf16(**kwargs_bf16).float() - truth).abs().max().item()
    assert torch_err > 0  # the comparison means something only if bf16 is really lossy here
    print(f"bf16 max error vs fp32: ours {our_err:.4f}, diffusers {torch_err:.4f}")
    assert our_err <= 2 * torch_err + 1e-3, (our_err, torch_err)


CONTEXT = ("latents_clean", "latents_history_2x", "latents_history_4x")


@pytest.mark.parametrize(
    "present",
    [c for r in range(len(CONTEXT) + 1) for c in itertools.combinations(CONTEXT, r)],
    ids=lambda c: "+".join(name.replace("latents_", "") for name in c) or "none",
)
@torch.no_grad()
def test_any_subset_of_context_inputs(pair, make_inputs, tiny_config, present):
    _, ours = pair
    kwargs = make_inputs(tiny_config, text_lengths=(10, 6))
    full = ours(**kwargs)
    index_names = {"latents_clean": "indices_latents_clean", "latents_history_2x": "indices_latents_history_2x",
                   "latents_history_4x": "indices_latents_history_4x"}
    for name in CONTEXT:
        if name not in present:
            kwargs[name] = kwargs[index_names[name]] = None
    kwargs["image_embeds"] = None if not present else kwargs["image_embeds"]
    out = ours(**kwargs)
    assert out.shape == kwargs["hidden_states"].shape and torch.isfinite(out).all()
    if len(present) < len(CONTEXT):
        assert (out - full).abs().max() > 1e-4  # the missing context really is missing, not ignored


@torch.no_grad()
def test_context_latents_without_indices_is_an_error(pair, make_inputs, tiny_config):
    _, ours = pair
    kwargs = make_inputs(tiny_config)
    kwargs["indices_latents_history_2x"] = None
    with pytest.raises(ValueError, match="pairs"):
        ours(**kwargs)


@torch.no_grad()
def test_per_sample_frame_indices(pair, make_inputs, tiny_config):
    """(B, T) indices that differ per sample: each sample gets its own positions."""
    _, ours = pair
    f1 = make_inputs(tiny_config, text_lengths=(10, 10), layout="f1")
    inv = make_inputs(tiny_config, text_lengths=(10, 10), layout="inverted")
    mixed = dict(f1)
    for name in ("indices_latents", "indices_latents_clean", "indices_latents_history_2x", "indices_latents_history_4x"):
        mixed[name] = torch.stack([f1[name], inv[name]])
    out = ours(**mixed)
    assert torch.allclose(out[0], ours(**f1)[0], atol=1e-5)
    assert torch.allclose(out[1], ours(**inv)[1], atol=1e-5)


@torch.no_grad()
def test_return_dict_false_gives_a_tuple(pair, make_inputs, tiny_config):
    _, ours = pair
    kwargs = make_inputs(tiny_config)
    (out,) = ours(**kwargs, return_dict=False)
    assert torch.equal(out, ours(**kwargs))


def test_13b_preset_has_the_released_parameters():
    model = FramePackTransformer.from_config("framepack-13b", device="meta")
    assert sum(p.numel() for p in model.parameters()) == 12_874_314_816
    with torch.device("meta"):
        ref = diffusers_model(FramePackConfig.preset("framepack-13b"))
    ours_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours_shapes == ref_shapes


def test_from_config_inside_a_meta_device_context_builds_on_meta():
    """The idiom accelerate's init_empty_weights and many users rely on: no memory, no copy out of meta."""
    with torch.device("meta"):
        model = FramePackTransformer.from_config("framepack-13b", dtype=torch.bfloat16)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert sum(p.numel() for p in model.parameters()) == 12_874_314_816
    # Outside the context the default is the CPU with real, seeded weights.
    tiny = FramePackTransformer.from_config("tiny")
    assert next(tiny.parameters()).device.type == "cpu" and next(tiny.parameters()).abs().sum() > 0


def test_tiny_preset_is_a_few_hundred_thousand_parameters():
    model = FramePackTransformer.from_config("tiny")
    assert 100_000 < sum(p.numel() for p in model.parameters()) < 1_000_000
    again = FramePackTransformer.from_config("tiny")
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))  # seeded


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ValueError, match="framepack-13b"):
        FramePackTransformer.from_config("huge")
