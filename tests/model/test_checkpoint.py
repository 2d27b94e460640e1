"""Loading and saving diffusers-format transformer folders through the real loading path."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from framepack_rt import FramePackConfig, FramePackTransformer
from framepack_rt.model.checkpoint import INDEX_NAME, WEIGHTS_NAME, CheckpointError

diffusers = pytest.importorskip("diffusers")


@pytest.fixture
def oracle(tiny_config):
    torch.manual_seed(0)
    kwargs = {k: v for k, v in tiny_config.to_json_dict().items() if not k.startswith("_")}
    return diffusers.HunyuanVideoFramepackTransformer3DModel(**kwargs).eval()


@pytest.mark.parametrize("shard_size", ["100KB", "10GB"], ids=["sharded", "single-file"])
@torch.no_grad()
def test_loads_a_folder_written_by_diffusers(tmp_path, oracle, make_inputs, tiny_config, shard_size):
    oracle.save_pretrained(tmp_path, max_shard_size=shard_size, safe_serialization=True)
    if shard_size == "100KB":
        assert (tmp_path / INDEX_NAME).exists() and len(list(tmp_path.glob("*.safetensors"))) > 2
    else:
        assert (tmp_path / WEIGHTS_NAME).exists()
    model = FramePackTransformer.from_pretrained(tmp_path, fp32_output_head=False)
    assert model.config == tiny_config
    kwargs = make_inputs(tiny_config, text_lengths=(10, 5))
    for name, tensor in oracle.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert (model(**kwargs) - oracle(**kwargs).sample).abs().max() <= 1e-5


@torch.no_grad()
def test_save_pretrained_round_trips_and_diffusers_reads_it(tmp_path, make_inputs, tiny_config):
    model = FramePackTransformer.from_config(tiny_config).eval()
    model.save_pretrained(tmp_path, max_shard_size=200_000)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(model.state_dict())
    back = FramePackTransformer.from_pretrained(tmp_path, fp32_output_head=False)
    kwargs = make_inputs(tiny_config)
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    # Same weights; only BLAS's alignment-dependent summation order can differ.
    assert (back(**kwargs) - model(**kwargs)).abs().max() <= 1e-6
    theirs = diffusers.HunyuanVideoFramepackTransformer3DModel.from_pretrained(tmp_path).eval()
    assert (theirs(**kwargs).sample - model(**kwargs)).abs().max() <= 1e-5
    # Saving again with one shard leaves no stale shards behind.
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", WEIGHTS_NAME]


def test_bf16_weights_are_memory_mapped_not_copied(tmp_path, tiny_config):
    FramePackTransformer.from_config(tiny_config, dtype=torch.bfloat16).save_pretrained(tmp_path, max_shard_size=150_000)
    model = FramePackTransformer.from_pretrained(tmp_path, dtype=torch.bfloat16)
    shard_sizes = {p.stat().st_size for p in tmp_path.glob("*.safetensors")}
    for name, param in model.named_parameters():
        assert param.dtype == torch.bfloat16
        storage = param.untyped_storage()
        # A view into the mapped file: its storage is a whole shard, not a per-tensor copy.
        assert storage.nbytes() in shard_sizes, name
    assert not any(p.is_meta for p in model.parameters())


def test_dtype_conversion_on_load(tmp_path, tiny_config):
    FramePackTransformer.from_config(tiny_config, dtype=torch.bfloat16).save_pretrained(tmp_path)
    model = FramePackTransformer.from_pretrained(tmp_path, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.fixture
def saved(tmp_path, tiny_config):
    FramePackTransformer.from_config(tiny_config).save_pretrained(tmp_path, max_shard_size=150_000)
    return tmp_path


def _edit_shard_holding(folder, key, edit):
    file = folder / json.loads((folder / INDEX_NAME).read_text())["weight_map"][key]
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, str(file))
    return file.name


def test_missing_key_names_the_key(saved):
    key = "transformer_blocks.1.attn.norm_added_k.weight"
    index = json.loads((saved / INDEX_NAME).read_text())
    del index["weight_map"][key]
    (saved / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"missing key '{key}'"):
        FramePackTransformer.from_pretrained(saved)


def test_key_missing_from_its_shard_names_key_and_file(saved):
    key = "proj_out.bias"
    file = _edit_shard_holding(saved, key, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=rf"'{key}'.*{file}"):
        FramePackTransformer.from_pretrained(saved)


def test_unexpected_key_names_key_and_file(saved):
    key = "x_embedder.proj.weight"
    file = _edit_shard_holding(saved, key, lambda t: t.__setitem__("lora_A.weight", torch.zeros(2)))
    index = json.loads((saved / INDEX_NAME).read_text())
    index["weight_map"]["lora_A.weight"] = file
    (saved / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"unexpected key 'lora_A.weight' in {file}"):
        FramePackTransformer.from_pretrained(saved)


def test_misshaped_key_names_key_file_and_shapes(saved):
    key = "norm_out.linear.weight"
    file = _edit_shard_holding(saved, key, lambda t: t.__setitem__(key, torch.zeros(3, 3)))
    with pytest.raises(CheckpointError, match=rf"'{key}' in {file} has shape \(3, 3\), the config expects \(64, 32\)"):
        FramePackTransformer.from_pretrained(saved)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        FramePackTransformer.from_pretrained(tmp_path)
    FramePackConfig.preset("tiny")  # sanity: presets still fine
    (tmp_path / "config.json").write_text(json.dumps(FramePackConfig.preset("tiny").to_json_dict()))
    with pytest.raises(FileNotFoundError, match=INDEX_NAME):
        FramePackTransformer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        FramePackTransformer.from_pretrained(tmp_path / "nope")


def test_unknown_config_key_is_reported(tmp_path):
    data = FramePackConfig.preset("tiny").to_json_dict() | {"num_mystery_layers": 3}
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="num_mystery_layers"):
        FramePackTransformer.from_pretrained(tmp_path)
