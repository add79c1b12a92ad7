"""Fine-tuning: from exported weights at another resolution, position embeddings resampled, the
head replaced by a zero-initialised linear layer, backbone copied, mismatches named."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vitscale.config import load_config
from vitscale.errors import ConfigError
from vitscale.model import build_model
from vitscale.model.weights import save_weights
from vitscale.research.finetune import build_finetune_model

TINY = ["model.name=B/16", "model.patch_size=4", "model.depth=2", "model.width=32", "model.mlp_dim=64",
        "model.heads=4", "engine.precision=fp32"]


def pretrained_weights(tmp_path, pos_embed="learned_1d", classifier="token"):
    config = load_config(None, TINY + ["model.image_size=16", "model.num_classes=10", "model.representation_size=32",
                                       f"model.pos_embed={pos_embed}", f"model.classifier={classifier}"])
    torch.manual_seed(0)
    model = build_model(config.model)
    with torch.no_grad():
        for p in model.parameters():  # make every tensor distinctive, including the zero-init ones
            p.add_(torch.randn_like(p) * 0.1)
    return save_weights(tmp_path / "pretrained.safetensors", model.state_dict(), config), model


def finetune_config(path, *extra):
    return load_config(None, TINY + ["model.image_size=32", "model.num_classes=3", "model.head=finetune",
                                     f"finetune.init_from={path}", *extra])


def test_position_embeddings_resampled_and_head_replaced(tmp_path):
    path, source = pretrained_weights(tmp_path)
    model = build_finetune_model(finetune_config(path))
    assert model.shape.image_size == 32 and model.shape.grid == 8
    old = source.pos_embed.weight.detach()                    # (1, 1 + 4*4, D)
    new = model.pos_embed.weight.detach()                     # (1, 1 + 8*8, D)
    assert new.shape == (1, 1 + 64, 32)
    assert torch.equal(new[0, 0], old[0, 0])                  # [class] embedding untouched
    grid = old[0, 1:].reshape(4, 4, 32).permute(2, 0, 1)[None]  # (1, D, 4, 4)
    expected = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False)[0].permute(1, 2, 0)
    torch.testing.assert_close(new[0, 1:], expected.reshape(64, 32))
    # Head: one zero-initialised linear layer for the 3 new classes; pre-logits gone.
    assert isinstance(model.head, torch.nn.Linear) and model.head.weight.shape == (3, 32)
    assert not model.head.weight.any() and not model.head.bias.any()
    assert isinstance(model.pre_logits, torch.nn.Identity)
    # Backbone copied exactly.
    for name, tensor in source.state_dict().items():
        if not name.startswith(("head.", "pre_logits.", "pos_embed.")):
            assert torch.equal(model.state_dict()[name], tensor), name
    assert not model(torch.randn(2, 3, 32, 32)).any()         # zero head: zero logits at the start


@pytest.mark.parametrize("pos_embed", ["learned_2d", "relative", "sincos_2d"])
def test_every_position_embedding_kind_moves_to_the_new_grid(tmp_path, pos_embed):
    path, _ = pretrained_weights(tmp_path, pos_embed=pos_embed, classifier="gap")
    config = finetune_config(path, f"model.pos_embed={pos_embed}", "model.classifier=gap")
    model = build_finetune_model(config)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    assert model.shape.grid == 8


@pytest.mark.parametrize("override,key", [("model.depth=3", "model.depth"),
                                          ("model.classifier=gap", "model.classifier"),
                                          ("model.patch_size=8", "model.patch_size")])
def test_architecture_mismatch_is_named(tmp_path, override, key):
    path, _ = pretrained_weights(tmp_path)
    with pytest.raises(ConfigError) as error:
        build_finetune_model(finetune_config(path, override))
    assert error.value.key == key


def test_pretraining_head_with_init_from_is_rejected(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_config(None, TINY + ["finetune.init_from=x.safetensors", "model.head=pretrain"])
    assert error.value.key == "model.head"
