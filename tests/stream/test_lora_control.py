"""The "lora" control message: parsed strictly, acknowledged with the section it applies from, per session."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from framepack_rt.stream import control
from framepack_rt.stream.client import StreamClient
from framepack_rt.stream.control import ControlError, LoraMessage, parse_client_message


@pytest.mark.parametrize("raw,expected", [
    ({"type": "lora", "name": "style", "scale": 0.5}, LoraMessage("style", 0.5)),
    ({"type": "lora", "name": "style", "scale": -2, "id": 7}, LoraMessage("style", -2.0, 7)),
])
def test_valid_lora_messages(raw, expected):
    msg = parse_client_message(json.dumps(raw))
    assert msg == expected
    assert parse_client_message(json.dumps(control.client_message(msg))) == msg


@pytest.mark.parametrize("raw,fragment", [
    ({"type": "lora", "scale": 1}, '"name"'),
    ({"type": "lora", "name": "", "scale": 1}, '"name"'),
    ({"type": "lora", "name": 3, "scale": 1}, '"name"'),
    ({"type": "lora", "name": "style"}, 'finite numeric "scale"'),
    ({"type": "lora", "name": "style", "scale": "1"}, 'finite numeric "scale"'),
    ({"type": "lora", "name": "style", "scale": True}, 'finite numeric "scale"'),
    ('{"type": "lora", "name": "style", "scale": NaN}', 'finite numeric "scale"'),
    ({"type": "lora", "name": "style", "scale": 1, "id": [1]}, 'lora "id"'),
])
def test_invalid_lora_messages_say_what_is_wrong(raw, fragment):
    with pytest.raises(ControlError, match=fragment):
        parse_client_message(raw if isinstance(raw, str) else json.dumps(raw))


@pytest.fixture
def lora_pipe(stream_pipe, tmp_path):
    """The shared tiny pipeline with one LoRA, "style" at scale 1 (a PEFT-layout file written here), taken
    out again afterwards."""
    g = torch.Generator().manual_seed(0)
    state = {}
    transformer = stream_pipe.parts.transformer()
    for name, module in transformer.named_modules():
        if name.startswith("transformer_blocks.0.attn.") and hasattr(module, "in_features"):
            state[f"transformer.{name}.lora_A.weight"] = torch.randn(2, module.in_features, generator=g)
            state[f"transformer.{name}.lora_B.weight"] = torch.randn(module.out_features, 2, generator=g)
    save_file(state, str(tmp_path / "style.safetensors"))
    stream_pipe.load_lora(tmp_path / "style.safetensors")
    yield stream_pipe
    stream_pipe.unload_loras()
    assert stream_pipe.lora_info() == [] and not transformer.transformer_blocks[0].attn.to_q._forward_hooks


def test_a_lora_scale_is_acknowledged_and_applies_from_that_section(lora_pipe, run_with_server):
    """Over the real control channel. (That each session keeps its own scales on the shared model is
    tests/pipeline/test_lora.py's interleaved-streams test.)"""
    async def scenario(server, url):
        client = StreamClient(url)
        try:
            await client.connect(prompt="a calm lake")
            config = await client.get_json("/api/config")
            await client.wait_for("section", timeout=30)
            since = len(client.messages)
            client.send({"type": "lora", "name": "style", "scale": 0.25, "id": "l1"})
            ack = await client.wait_for("lora_ack", timeout=10, since=since)
            stream = server.sessions[client.session].generation.stream
            await client.wait_for(lambda m: m.get("type") == "section" and m["index"] >= ack["section"], 30, since)
            after = stream.lora_scales
            errors = []
            for bad in ({"type": "lora", "name": "nope", "scale": 1}, {"type": "lora", "name": "style", "scale": 9}):
                since = len(client.messages)
                client.send(bad)
                errors.append(await client.wait_for("error", timeout=10, since=since))
            return config, ack, after, errors
        finally:
            await client.close()

    config, ack, after, errors = run_with_server(lora_pipe, scenario, timeout=120)
    assert config["loras"] == [{"name": "style", "scale": 1.0, "format": "peft", "layers": 8, "fused": False}]
    assert ack == {"type": "lora_ack", "id": "l1", "name": "style", "scale": 0.25, "section": ack["section"]}
    assert ack["section"] >= 1
    assert after == {"style": 0.25}  # the session's stream took it (the pipeline's default stays 1)
    assert lora_pipe.lora_scales() == {"style": 1.0}
    assert "no LoRA named 'nope'; loaded: style" in errors[0]["message"]
    assert "out of range" in errors[1]["message"]
