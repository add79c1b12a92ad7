"""The vitscale weights file: exact round trip, fp32, no pickle, one clear error per bad input."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vitscale.config import load_config
from vitscale.errors import CheckpointError
from vitscale.model import build_model
from vitscale.model.weights import load_model, load_weights, save_weights

TINY = Path(__file__).resolve().parents[1] / "configs" / "vit_b16_i21k_tiny.yaml"


@pytest.fixture()
def tiny():
    config = load_config(TINY, ["model.classifier=gap", "model.pos_embed=learned_2d"])
    torch.manual_seed(0)
    return build_model(config.model), config


def test_round_trip_is_exact_and_carries_the_config(tmp_path, tiny):
    model, config = tiny
    path = save_weights(tmp_path / "w.safetensors", model.state_dict(), config)
    state, loaded = load_weights(path)
    assert loaded == config
    assert state.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert state[name].dtype == torch.float32
        assert torch.equal(state[name], tensor), name
    rebuilt, _ = load_model(path)
    images = torch.randn(2, 3, 32, 32)
    model.eval(), rebuilt.eval()
    assert torch.equal(model(images), rebuilt(images))


def test_bf16_weights_are_stored_as_fp32_and_file_has_no_pickle(tmp_path, tiny):
    model, config = tiny
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    path = save_weights(tmp_path / "w.safetensors", state, config)
    raw = path.read_bytes()
    header_size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + header_size])
    dtypes = {entry["dtype"] for name, entry in header.items() if name != "__metadata__"}
    assert dtypes == {"F32"}
    assert b"\x80\x04" not in raw[:8 + header_size]  # no pickle protocol marker in the header
    assert "vitscale_config" in header["__metadata__"]


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_weights(tmp_path / "nope.safetensors")


def test_not_safetensors(tmp_path, tiny):
    model, _ = tiny
    path = tmp_path / "w.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_weights(path)


def test_plain_safetensors_without_config(tmp_path, tiny):
    model, _ = tiny
    path = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with pytest.raises(CheckpointError, match="no vitscale config"):
        load_weights(path)


def test_shape_mismatch_names_the_tensor(tmp_path, tiny):
    model, config = tiny
    state = dict(model.state_dict())
    state["head.weight"] = torch.zeros(7, 64)
    path = save_weights(tmp_path / "w.safetensors", state, config)
    with pytest.raises(CheckpointError, match=r"shape mismatch head\.weight \(7, 64\) vs \(10, 64\)"):
        load_weights(path)
    del state["head.weight"]
    save_weights(path, state, config)
    with pytest.raises(CheckpointError, match=r"missing head\.weight"):
        load_weights(path)
