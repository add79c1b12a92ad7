"""The ViT family: paper parameter counts, every variant trains, backends agree, resampling."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from vitscale.config import load_config
from vitscale.model import SIZES, ModelConfig, build_model, count_parameters
from vitscale.errors import ConfigError
from vitscale.model.config import parse_model_name

# Paper, Table 1 (and ViT-L/16 = 304M as usually quoted), backbone without the classifier.
PAPER_PARAMS = {"B/16": 86e6, "L/16": 304e6, "H/14": 632e6}


def tiny(**overrides) -> ModelConfig:
    base = dict(name="B/16", image_size=32, patch_size=8, depth=2, width=32, mlp_dim=64, heads=4,
                num_classes=5, representation_size=16)
    return ModelConfig(**{**base, **overrides})


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_parameter_counts_match_paper(name):
    with torch.device("meta"):
        model = build_model(ModelConfig(name=name, num_classes=1000))
    backbone = count_parameters(model, include_head=False)
    assert abs(backbone - PAPER_PARAMS[name]) / PAPER_PARAMS[name] < 0.01, backbone


@pytest.mark.parametrize("size", list(SIZES))
def test_every_preset_builds(size):
    with torch.device("meta"):
        model = build_model(ModelConfig(name=f"{size}/14"))
    depth, width, mlp_dim, heads = SIZES[size]
    assert len(model.blocks) == depth and model.shape.width == width
    # Counted from the architecture's definition: patch projection, [class], position table,
    # per block 2 LayerNorms + qkv + out-projection + 2 MLP linears, final LayerNorm.
    d, m, patch, tokens = width, mlp_dim, 14, (224 // 14) ** 2 + 1
    per_block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * m + m) + (m * d + d)
    expected = (3 * patch * patch * d + d) + d + tokens * d + depth * per_block + 2 * d
    assert count_parameters(model, include_head=False) == expected


VARIANTS = list(itertools.product(("token", "gap", "map"),
                                  ("none", "learned_1d", "learned_2d", "sincos_2d", "relative"),
                                  ("pre", "post"), ("math", "sdpa")))


@pytest.mark.parametrize("classifier,pos_embed,norm_position,backend", VARIANTS)
def test_variant_trains(classifier, pos_embed, norm_position, backend):
    torch.manual_seed(0)
    model = build_model(tiny(classifier=classifier, pos_embed=pos_embed, norm_position=norm_position,
                             attention_backend=backend))
    images = torch.randn(3, 3, 32, 32)
    logits = model(images)
    assert logits.shape == (3, 5)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name} has a non-finite gradient"
        assert param.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


@pytest.mark.parametrize("pos_embed", ["learned_1d", "relative"])
def test_math_and_sdpa_agree(pos_embed):
    outputs = {}
    for backend in ("math", "sdpa"):
        torch.manual_seed(1)
        model = build_model(tiny(attention_backend=backend, pos_embed=pos_embed, width=64, depth=3)).eval()
        torch.manual_seed(2)
        outputs[backend] = model(torch.randn(4, 3, 32, 32))
    torch.testing.assert_close(outputs["math"], outputs["sdpa"], atol=1e-5, rtol=1e-5)


def test_stochastic_depth_and_dropout_are_train_only():
    torch.manual_seed(0)
    model = build_model(tiny(dropout=0.5, drop_path=0.5))
    images = torch.randn(2, 3, 32, 32)
    model.eval()
    assert torch.equal(model(images), model(images))
    model.train()
    assert not torch.equal(model(images), model(images))


def test_finetune_head_starts_at_zero_and_pretrain_head_has_tanh_prelogits():
    finetune = build_model(tiny(head="finetune"))
    assert torch.count_nonzero(finetune.head.weight) == 0
    assert finetune(torch.randn(2, 3, 32, 32)).abs().max() == 0
    pretrain = build_model(tiny(head="pretrain", representation_size=16))
    assert isinstance(pretrain.pre_logits[1], torch.nn.Tanh) and pretrain.head.in_features == 16


def test_post_ln_differs_from_pre_ln_structurally():
    torch.manual_seed(0)
    pre = build_model(tiny(norm_position="pre"))
    torch.manual_seed(0)
    post = build_model(tiny(norm_position="post"))
    # Same parameters except pre-LN's final norm; the computation must differ.
    assert set(dict(pre.named_parameters())) - set(dict(post.named_parameters())) == {"norm.weight", "norm.bias"}
    images = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(pre(images), post(images))


# ---------------------------------------------------------------------------------------------
# Position-embedding resampling, against an independent bicubic written here from its definition
# (Keys cubic convolution, a = -0.75, half-pixel centres, edge clamping).


def _cubic(t: float, a: float = -0.75) -> float:
    t = abs(t)
    if t <= 1:
        return (a + 2) * t**3 - (a + 3) * t**2 + 1
    if t < 2:
        return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
    return 0.0


def _resize_axis(values: np.ndarray, new: int, axis: int) -> np.ndarray:
    old = values.shape[axis]
    values = np.moveaxis(values, axis, 0)
    out = np.zeros((new,) + values.shape[1:])
    for i in range(new):
        src = (i + 0.5) * old / new - 0.5
        base = math.floor(src)
        for offset in (-1, 0, 1, 2):
            index = min(max(base + offset, 0), old - 1)
            out[i] += _cubic(src - (base + offset)) * values[index]
    return np.moveaxis(out, 0, axis)


def reference_bicubic(grid: np.ndarray, new: int) -> np.ndarray:
    """(g, g, D) -> (new, new, D)."""
    return _resize_axis(_resize_axis(grid, new, 0), new, 1)


def test_resample_to_same_grid_is_identity():
    torch.manual_seed(0)
    model = build_model(tiny())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.resample_position_embeddings(32)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_resample_learned_1d_matches_reference_bicubic_and_keeps_class_embedding():
    torch.manual_seed(0)
    model = build_model(tiny(image_size=32, patch_size=8, width=16, heads=2))  # grid 4
    old = model.pos_embed.weight.detach().clone()
    model.resample_position_embeddings(56, "bicubic")  # grid 7
    new = model.pos_embed.weight.detach()
    assert new.shape == (1, 1 + 49, 16)
    assert torch.equal(new[0, 0], old[0, 0])
    expected = reference_bicubic(old[0, 1:].reshape(4, 4, 16).double().numpy(), 7).reshape(49, 16)
    np.testing.assert_allclose(new[0, 1:].numpy(), expected, atol=1e-5)
    assert model(torch.randn(2, 3, 56, 56)).shape == (2, 5)


@pytest.mark.parametrize("pos_embed", ["learned_2d", "sincos_2d", "relative", "none"])
def test_resample_other_kinds_runs_at_new_resolution(pos_embed):
    model = build_model(tiny(pos_embed=pos_embed))
    model.resample_position_embeddings(48)
    assert model(torch.randn(2, 3, 48, 48)).shape == (2, 5)


# ---------------------------------------------------------------------------------------------
# Config: names decode from one table; mistakes are one clear line.


def test_model_names_decode():
    assert parse_model_name("H/14") == ("H", 14)
    shape = load_config(None, ["model.name=H/14"]).model.shape()
    assert (shape.depth, shape.width, shape.heads, shape.head_dim, shape.num_patches + 1) == (32, 1280, 16, 80, 257)


def test_the_model_label_is_the_name_only_when_the_shape_is_the_named_one():
    from vitscale.model import ModelConfig

    assert ModelConfig(name="H/14").label == "H/14"
    assert ModelConfig(name="H/14", depth=32, heads=16).label == "H/14"  # the table's values, spelled out
    assert ModelConfig(name="H/14", depth=2, width=160, mlp_dim=320, heads=2).label == \
        "depth2-width160-mlp320-heads2/14"
    assert ModelConfig(name="B/16", patch_size=32).label == "depth12-width768-mlp3072-heads12/32"


def test_class_token_with_average_pooling_averages_the_patch_tokens_only():
    """timm's class_token=True + global_pool='avg': the [class] token attends but is not pooled."""
    from vitscale.model.flops import tokens_per_image

    config = ModelConfig(name="Ti/16", depth=1, image_size=32, num_classes=3, classifier="gap", class_token=True)
    config.validate()
    model = build_model(config).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert tokens.shape == (2, 1 + 4, 192) and tokens_per_image(config) == 5
        assert torch.allclose(model.forward_representation(x), tokens[:, 1:].mean(dim=1))
    with pytest.raises(ConfigError, match="model.class_token"):
        ModelConfig(classifier="token", class_token=False).validate()
