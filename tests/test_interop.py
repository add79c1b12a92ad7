"""Weight interop against the libraries themselves: models randomly initialised by timm and
transformers (nothing can be downloaded) must give the same outputs after conversion, and the
Google .npz layout is checked with timm's own .npz loader as the independent reader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import transformers
from safetensors.torch import save_file

from vitscale.cli import main as vitscale_main
from vitscale.config import Config
from vitscale.errors import CheckpointError
from vitscale.interop import npz_to_vitscale, read_npz, vitscale_to_npz, write_npz
from vitscale.interop.cli import convert
from vitscale.model import ModelConfig, build_model
from vitscale.model.weights import load_model, save_weights

TOLERANCE = 1e-4


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def perturb(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Libraries start biases, [class] tokens and LayerScale at constants; randomise every
    parameter so that a mix-up of any two tensors shows in the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    return module.eval()


def images(n: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def save_timm(model, path: Path) -> Path:
    """A bare timm state dict: tensors only, nothing names the architecture."""
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def save_timm_hub(model, directory: Path) -> Path:
    """timm's own Hub export: model.safetensors + config.json (architecture, global_pool, model_args)."""
    from timm.models._hub import save_for_hf

    save_for_hf(model, directory)
    return directory


def converted(tmp_path: Path, source: Path, *overrides: str):
    out = tmp_path / "converted.safetensors"
    assert vitscale_main(["convert", str(source), str(out), *overrides]) == 0
    model, config = load_model(out)
    return model.eval(), config


# ---------------------------------------------------------------------------------------------
# timm


TIMM_VARIANTS = {
    "token": dict(),
    "layerscale_no_embed_class_no_qkv_bias": dict(init_values=0.5, no_embed_class=True, qkv_bias=False),
    "gap": dict(class_token=False, global_pool="avg", fc_norm=False),
    "map": dict(class_token=False, global_pool="map"),
}


@pytest.mark.parametrize("variant", TIMM_VARIANTS)
def test_timm_logits_match(tmp_path, variant):
    original = perturb(timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32,
                                         patch_size=8, num_classes=10, **TIMM_VARIANTS[variant]))
    model, config = converted(tmp_path, save_timm_hub(original, tmp_path / "hub"))
    assert config.model.heads == 3 and config.model.depth == 2 and config.model.image_size == 32
    x = images()
    with torch.no_grad():
        expected, got = original(x), model(x)
    assert expected.abs().max() > 0.1  # a non-trivial function
    assert max_diff(expected, got) <= TOLERANCE


def test_timm_registered_gap_model_gets_its_own_head_count(tmp_path):
    """timm's vit_base_patch16_gap_224 is 768 wide with 16 heads (the paper's B: 12). Named by
    its file name or timm's config.json it converts to timm's logits; a bare state dict is
    refused in one line instead of being given the paper's 12."""
    original = perturb(timm.create_model("vit_base_patch16_gap_224", pretrained=False, depth=1, img_size=32,
                                         num_classes=5))
    assert original.blocks[0].attn.num_heads == 16
    for source in (save_timm(original, tmp_path / "vit_base_patch16_gap_224.augreg.safetensors"),
                   save_timm_hub(original, tmp_path / "hub")):
        model, config = converted(tmp_path, source)
        assert config.model.heads == 16 and config.model.classifier == "gap"
        with torch.no_grad():
            assert max_diff(original(images()), model(images())) <= TOLERANCE
    bare = save_timm(original, tmp_path / "weights.safetensors")
    with pytest.raises(CheckpointError, match=r"does not record model\.heads.*ViT-B of this width has 12"):
        convert(bare, tmp_path / "out.safetensors")


def test_timm_class_token_with_average_pooling(tmp_path):
    """A [class] token and global_pool='avg' (fc_norm=False): the patch tokens are averaged, the
    [class] token only takes part in attention. From timm's config.json it converts exactly;
    as a bare state dict the pooling is asked for, and model.classifier=gap gives the same logits."""
    original = perturb(timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32,
                                         patch_size=8, num_classes=6, global_pool="avg", fc_norm=False))
    assert original.cls_token is not None
    model, config = converted(tmp_path, save_timm_hub(original, tmp_path / "hub"))
    assert config.model.classifier == "gap" and config.model.class_token is True
    with torch.no_grad():
        assert max_diff(original(images()), model(images())) <= TOLERANCE
    bare = save_timm(original, tmp_path / "weights.safetensors")
    with pytest.raises(CheckpointError, match=r"does not record model\.classifier.*'avg': gap"):
        convert(bare, tmp_path / "out.safetensors", overrides=["model.heads=3"])
    model, _ = converted(tmp_path, bare, "model.heads=3", "model.classifier=gap")
    with torch.no_grad():
        assert max_diff(original(images()), model(images())) <= TOLERANCE


def test_timm_name_that_disagrees_with_the_weights_is_refused(tmp_path):
    original = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32, patch_size=8)
    source = save_timm(original, tmp_path / "vit_small_patch16_224.safetensors")  # S is 384 wide, these 192
    with pytest.raises(CheckpointError, match=r"names timm's vit_small_patch16_224 \(width 384\).*192 wide"):
        convert(source, tmp_path / "out.safetensors")


def test_timm_nonstandard_width_needs_heads_flag(tmp_path):
    original = perturb(timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32, patch_size=8,
                                         num_classes=4, embed_dim=96, num_heads=4))
    source = save_timm(original, tmp_path / "timm.safetensors")
    with pytest.raises(CheckpointError, match=r"does not record model\.classifier.* and model\.heads.*"
                                              r"them as model\.classifier=VALUE model\.heads=VALUE"):
        convert(source, tmp_path / "out.safetensors")
    model, config = converted(tmp_path, source, "model.heads=4", "model.classifier=token")
    assert config.model.shape().heads == 4
    with torch.no_grad():
        assert max_diff(original(images()), model(images())) <= TOLERANCE
    with pytest.raises(CheckpointError, match="shape mismatch pos_embed.weight"):
        convert(source, tmp_path / "out.safetensors", overrides=["model.heads=4", "model.classifier=token",
                                                                 "model.image_size=64"])


def test_timm_training_checkpoint_pth_is_read_without_unpickling_code(tmp_path):
    original = perturb(timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32,
                                         patch_size=8, num_classes=3))
    source = tmp_path / "checkpoint.pth"
    # timm's train.py checkpoint: the model name under "arch", DDP-prefixed weights under "model"
    torch.save({"epoch": 3, "arch": "vit_tiny_patch16_224",
                "model": {f"module.{k}": v for k, v in original.state_dict().items()}}, source)
    model, _ = converted(tmp_path, source)
    with torch.no_grad():
        assert max_diff(original(images()), model(images())) <= TOLERANCE
    (tmp_path / "code.pth").write_bytes(b"\x80\x02cos\nsystem\n.")  # a pickle that would import os.system
    with pytest.raises(CheckpointError, match="neither safetensors nor a plain PyTorch state dict"):
        convert(tmp_path / "code.pth", tmp_path / "out.safetensors", source_format="timm")


def test_timm_without_position_table_needs_the_image_size(tmp_path):
    original = perturb(timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32,
                                         patch_size=8, num_classes=3, pos_embed="none"))
    source = save_timm_hub(original, tmp_path / "hub")
    with pytest.raises(CheckpointError, match=r"model\.image_size"):
        convert(source, tmp_path / "out.safetensors")
    model, config = converted(tmp_path, source, "model.image_size=32")
    assert config.model.pos_embed == "none"
    with torch.no_grad():
        assert max_diff(original(images()), model(images())) <= TOLERANCE


@pytest.mark.parametrize("name,reason", [("deit_tiny_distilled_patch16_224", "distillation token"),
                                         ("vit_relpos_small_patch16_224", "VisionTransformerRelPos"),
                                         ("vit_srelpos_small_patch16_224", "VisionTransformerRelPos")])
def test_timm_distilled_and_relpos_models_are_refused_for_what_they_are(tmp_path, name, reason):
    original = timm.create_model(name, pretrained=False, depth=1, img_size=32)
    with pytest.raises(CheckpointError, match=reason):
        convert(save_timm(original, tmp_path / "timm.safetensors"), tmp_path / "out.safetensors")


def test_timm_pool_then_norm_is_refused(tmp_path):
    original = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32, patch_size=8,
                                 class_token=False, global_pool="avg")  # fc_norm defaults on for avg
    with pytest.raises(CheckpointError, match="fc_norm=False"):
        convert(save_timm(original, tmp_path / "timm.safetensors"), tmp_path / "out.safetensors")


# ---------------------------------------------------------------------------------------------
# Hugging Face


def hf_config(**overrides):
    base = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
                patch_size=8, num_labels=5)
    return transformers.ViTConfig(**{**base, **overrides})


@pytest.mark.parametrize("overrides", [{}, {"hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 0.3}],
                         ids=["defaults", "tanh_gelu_large_eps"])
def test_hf_classification_logits_match(tmp_path, overrides):
    original = perturb(transformers.ViTForImageClassification(hf_config(**overrides)))
    original.save_pretrained(tmp_path / "hf")
    model, config = converted(tmp_path, tmp_path / "hf")
    assert config.model.layer_norm_eps == original.config.layer_norm_eps
    with torch.no_grad():
        expected, got = original(pixel_values=images()).logits, model(images())
    assert max_diff(expected, got) <= TOLERANCE


def test_hf_model_pooler_is_the_pre_logits(tmp_path):
    original = perturb(transformers.ViTModel(hf_config()))
    original.save_pretrained(tmp_path / "hf")
    model, config = converted(tmp_path, tmp_path / "hf")
    assert config.model.num_classes == 0 and config.model.representation_size == 64
    with torch.no_grad():
        out = original(pixel_values=images())
        assert max_diff(out.pooler_output, model.forward_representation(images())) <= TOLERANCE
        assert max_diff(out.last_hidden_state, model.forward_features(images())) <= TOLERANCE


@pytest.mark.parametrize("cls", ["DeiTForImageClassificationWithTeacher", "DeiTForImageClassification"])
def test_hf_deit_is_refused_for_its_distillation_token(tmp_path, cls):
    deit = getattr(transformers, cls)(transformers.DeiTConfig(**hf_config().to_dict()))
    deit.save_pretrained(tmp_path / "deit")
    with pytest.raises(CheckpointError, match="distillation token"):
        convert(tmp_path / "deit", tmp_path / "out.safetensors")


def test_linear_pooler_that_is_not_the_identity_is_refused(tmp_path):
    original = perturb(transformers.ViTModel(hf_config(pooler_act="linear")))
    original.save_pretrained(tmp_path / "hf")
    with pytest.raises(CheckpointError, match="not the identity"):
        convert(tmp_path / "hf", tmp_path / "out.safetensors")


def test_hf_bare_state_dict_uses_hf_defaults_and_flags(tmp_path):
    original = perturb(transformers.ViTForImageClassification(hf_config()))
    source = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in original.state_dict().items()}, str(source))
    model, config = converted(tmp_path, source, "model.heads=4")
    assert config.model.layer_norm_eps == 1e-12
    with torch.no_grad():
        assert max_diff(original(pixel_values=images()).logits, model(images())) <= TOLERANCE


def vitscale_model(**fields) -> tuple[torch.nn.Module, Config]:
    base = dict(name="Ti/8", image_size=32, depth=2, width=64, mlp_dim=128, heads=4, num_classes=7)
    config = Config(model=ModelConfig(**{**base, **fields})).validate()
    torch.manual_seed(0)
    return perturb(build_model(config.model), seed=2), config


@pytest.mark.parametrize("fields", [{"head": "finetune"}, {"num_classes": 0, "representation_size": 48,
                                                            "mlp_activation": "gelu_tanh"}, {"num_classes": 0}],
                         ids=["classifier", "backbone_with_pooler", "backbone_without_pooler"])
def test_export_to_hf_loads_in_transformers(tmp_path, fields):
    model, config = vitscale_model(**fields)
    source = save_weights(tmp_path / "w.safetensors", model.state_dict(), config)
    assert vitscale_main(["convert", str(source), str(tmp_path / "hf"), "--to", "hf"]) == 0
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    with torch.no_grad():
        if config.model.num_classes:
            assert saved["architectures"] == ["ViTForImageClassification"]
            hf = transformers.ViTForImageClassification.from_pretrained(tmp_path / "hf").eval()
            assert max_diff(hf(pixel_values=images()).logits, model(images())) <= TOLERANCE
        elif config.model.representation_size:
            hf = transformers.ViTModel.from_pretrained(tmp_path / "hf").eval()
            pooled = hf(pixel_values=images()).pooler_output
            assert max_diff(pooled, model.forward_representation(images())) <= TOLERANCE
        else:  # a plain from_pretrained initialises nothing at random: the pooler is the identity
            hf, info = transformers.ViTModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
            assert not info["missing_keys"] and not info["unexpected_keys"], info
            out = hf.eval()(pixel_values=images())
            assert max_diff(out.last_hidden_state, model.forward_features(images())) <= TOLERANCE
            assert max_diff(out.pooler_output, model.forward_representation(images())) <= TOLERANCE
    # ... and back again, exactly.
    back, _ = converted(tmp_path, tmp_path / "hf")
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


@pytest.mark.parametrize("fields", [{}, {"classifier": "gap"}, {"classifier": "gap", "class_token": True},
                                    {"classifier": "map", "mlp_activation": "gelu_tanh"}, {"num_classes": 0}],
                         ids=["token", "gap", "class-token-gap", "map-gelu-tanh", "headless"])
def test_export_to_timm_loads_with_timm_create_model(tmp_path, fields):
    """--to timm writes what timm's save_for_hf writes; timm rebuilds it itself from the folder
    (create_model("local-dir:...", pretrained=True)) and gives the same outputs; converting the
    folder back gives the same tensors."""
    model, config = vitscale_model(**fields)
    source = save_weights(tmp_path / "w.safetensors", model.state_dict(), config)
    assert vitscale_main(["convert", str(source), str(tmp_path / "timm"), "--to", "timm"]) == 0
    reference = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    with torch.no_grad():
        expected = model(images()) if config.model.num_classes else model.forward_representation(images())
        assert max_diff(reference(images()), expected) <= TOLERANCE
    back, back_config = converted(tmp_path, tmp_path / "timm")
    assert back_config.model.classifier == config.model.classifier
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_export_to_timm_refuses_what_timm_cannot_express(tmp_path):
    model, config = vitscale_model(norm_position="post")
    source = save_weights(tmp_path / "w.safetensors", model.state_dict(), config)
    with pytest.raises(CheckpointError, match="model.norm_position=post cannot be exported to timm"):
        convert(source, tmp_path / "timm", target="timm")


def test_export_to_hf_refuses_what_hf_cannot_express(tmp_path):
    model, config = vitscale_model(classifier="gap")
    source = save_weights(tmp_path / "w.safetensors", model.state_dict(), config)
    assert vitscale_main(["convert", str(source), str(tmp_path / "hf"), "--to", "hf"]) == 2
    with pytest.raises(CheckpointError, match="model.classifier=gap cannot be exported to Hugging Face"):
        convert(source, tmp_path / "hf", target="hf")


# ---------------------------------------------------------------------------------------------
# Google .npz (vision_transformer and big_vision layouts)


def timm_reads_npz(path: Path, **kwargs) -> torch.nn.Module:
    """timm's own .npz loader, an implementation independent of vitscale's reader."""
    from timm.models.vision_transformer import _load_weights

    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32, patch_size=8,
                                  embed_dim=64, num_heads=4, mlp_ratio=2.0, num_classes=7, act_layer="gelu_tanh",
                                  **kwargs)
    with torch.no_grad():
        _load_weights(reference, str(path))
    return reference.eval()


@pytest.mark.parametrize("layout,fields,timm_kwargs", [
    ("vision_transformer", {}, {}),
    ("big_vision", {}, {"no_embed_class": True}),
    ("big_vision", {"classifier": "map"}, {"class_token": False, "global_pool": "map"}),
], ids=["vision_transformer", "big_vision", "big_vision_map"])
def test_npz_layouts_read_by_timm_and_round_trip(tmp_path, layout, fields, timm_kwargs):
    model, config = vitscale_model(mlp_activation="gelu_tanh", **fields)
    path = write_npz(tmp_path / "vit.npz", vitscale_to_npz(model.state_dict(), config.model, layout))
    x = images()
    with torch.no_grad():
        expected = model(x)
        assert max_diff(timm_reads_npz(path, **timm_kwargs)(x), expected) <= TOLERANCE
    imported = npz_to_vitscale(read_npz(path))
    assert imported.model["mlp_activation"] == "gelu_tanh" and imported.model["heads"] == 4
    back, back_config = load_model(convert(path, tmp_path / "back.safetensors") and tmp_path / "back.safetensors")
    assert back_config.model.classifier == config.model.classifier
    with torch.no_grad():
        assert max_diff(back.eval()(x), expected) <= TOLERANCE
    if layout == "vision_transformer":  # same parameterisation: the round trip is bit-exact
        for name, tensor in model.state_dict().items():
            assert torch.equal(back.state_dict()[name], tensor), name


def test_npz_with_pre_logits_and_scanned_blocks_and_prefix(tmp_path):
    model, config = vitscale_model(mlp_activation="gelu_tanh", representation_size=32)
    arrays = vitscale_to_npz(model.state_dict(), config.model, "big_vision")
    # big_vision with scan_layers: one encoderblock with depth stacked first; wrapped in params/.
    blocks = [k for k in arrays if k.startswith("Transformer/encoderblock_")]
    scanned = {}
    for key in blocks:
        index, rest = key[len("Transformer/encoderblock_"):].split("/", 1)
        scanned.setdefault(rest, {})[int(index)] = arrays.pop(key)
    for rest, per_block in scanned.items():
        arrays[f"Transformer/encoderblock/{rest}"] = np.stack([per_block[i] for i in sorted(per_block)])
    path = write_npz(tmp_path / "scan.npz", {f"params/{k}": v for k, v in arrays.items()})
    back, back_config = load_model(convert(path, tmp_path / "b.safetensors") and tmp_path / "b.safetensors")
    assert back_config.model.representation_size == 32
    with torch.no_grad():
        assert max_diff(back.eval()(images()), model(images())) <= TOLERANCE


def test_sincos_matches_big_vision_and_converts_with_flags(tmp_path):
    from vitscale.model.posemb import sincos_2d

    # big_vision's posemb_sincos_2d (MoCo v3), transcribed in numpy as the reference.
    grid, width = 4, 64
    y, x = np.mgrid[:grid, :grid]
    omega = 1.0 / 10_000.0 ** (np.arange(width // 4) / (width // 4 - 1))
    y, x = np.einsum("m,d->md", y.flatten(), omega), np.einsum("m,d->md", x.flatten(), omega)
    reference = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
    assert np.allclose(sincos_2d(grid, width, 0)[0].numpy(), reference, atol=1e-6)

    model, config = vitscale_model(mlp_activation="gelu_tanh", pos_embed="sincos_2d", classifier="gap")
    path = write_npz(tmp_path / "sincos.npz", vitscale_to_npz(model.state_dict(), config.model, "big_vision"))
    with pytest.raises(CheckpointError, match=r"does not record model\.(pos_embed|image_size)"):
        convert(path, tmp_path / "back.safetensors")
    convert(path, tmp_path / "back.safetensors", overrides=["model.pos_embed=sincos_2d", "model.image_size=32"])
    back, _ = load_model(tmp_path / "back.safetensors")
    with torch.no_grad():
        assert max_diff(back.eval()(images()), model(images())) <= TOLERANCE


def test_npz_bfloat16_arrays_are_widened(tmp_path):
    model, config = vitscale_model(mlp_activation="gelu_tanh")
    arrays = vitscale_to_npz(model.state_dict(), config.model, "vision_transformer")
    # numpy has no bfloat16: such checkpoints hold the top 16 bits of each float32 as 2-byte voids.
    stored = {k: (v.view(np.uint32) >> 16).astype(np.uint16).view(np.dtype("V2")) for k, v in arrays.items()}
    imported = npz_to_vitscale(read_npz(write_npz(tmp_path / "bf16.npz", stored)))
    truncated = (arrays["head/kernel"].view(np.uint32) & 0xFFFF0000).view(np.float32)
    assert np.array_equal(imported.state_dict["head.weight"].numpy(), truncated.T)
    assert imported.state_dict["head.weight"].dtype == torch.float32


def test_cli_writes_npz(tmp_path):
    model, config = vitscale_model(mlp_activation="gelu_tanh")
    source = save_weights(tmp_path / "w.safetensors", model.state_dict(), config)
    out = tmp_path / "vit.npz"
    assert vitscale_main(["convert", str(source), str(out), "--to", "npz"]) == 0
    assert "Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel" in read_npz(out)
    assert read_npz(out)["Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel"].shape == (64, 4, 16)


def test_bad_sources_give_one_line_errors(tmp_path, capsys):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    assert vitscale_main(["convert", str(junk), str(tmp_path / "o.safetensors")]) == 2
    assert "not a readable .npz" in capsys.readouterr().err
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    with pytest.raises(CheckpointError, match="no embedding/kernel"):
        convert(tmp_path / "other.npz", tmp_path / "o.safetensors")
    assert vitscale_main(["convert", str(tmp_path / "missing.pth"), str(tmp_path / "o.safetensors")]) == 2
    assert "not found" in capsys.readouterr().err
