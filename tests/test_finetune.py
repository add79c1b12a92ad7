"""Fine-tuning: from exported weights at another resolution, position embeddings resampled, the
head replaced by a zero-initialised linear layer, backbone copied, mismatches named."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F

from vitscale.config import load_config
from vitscale.errors import ConfigError
from vitscale.model import build_model
from vitscale.model.posemb import resample_1d_embedding
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
    model = build_finetune_model(finetune_config(path, "finetune.posemb_resample=bicubic"))
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


def big_vision_resample_posemb(old: np.ndarray, new_tokens: int) -> np.ndarray:
    """big_vision's models/vit.py resample_posemb (the paper's vit_jax checkpoint.py does the same):
    (1, g*g, D) -> (1, new*new, D) with scipy.ndimage.zoom, order 1."""
    gs_old, gs_new = int(np.sqrt(old.shape[1])), int(np.sqrt(new_tokens))
    grid = old.reshape(gs_old, gs_old, -1)
    zoom = (gs_new / gs_old, gs_new / gs_old, 1)
    return scipy.ndimage.zoom(grid, zoom, order=1).reshape(1, gs_new * gs_new, -1)


@pytest.mark.parametrize("old_grid,new_grid", [(4, 8), (7, 12), (8, 5)])
def test_bilinear_corners_is_big_vision_resample_posemb(old_grid, new_grid):
    torch.manual_seed(0)
    weight = torch.randn(1, 1 + old_grid * old_grid, 16, dtype=torch.float64)
    ours = resample_1d_embedding(weight, 1, new_grid, "bilinear_corners")
    theirs = big_vision_resample_posemb(weight[:, 1:].numpy(), new_grid * new_grid)
    np.testing.assert_allclose(ours[:, 1:].numpy(), theirs, rtol=0, atol=1e-6)
    assert torch.equal(ours[:, :1], weight[:, :1])


@pytest.mark.parametrize("old_grid,new_grid", [(4, 8), (14, 24), (8, 5)])
def test_bicubic_antialias_is_timm_resample_abs_pos_embed(old_grid, new_grid):
    timm_layers = pytest.importorskip("timm.layers")
    torch.manual_seed(0)
    weight = torch.randn(1, 1 + old_grid * old_grid, 16)
    ours = resample_1d_embedding(weight, 1, new_grid, "bicubic_antialias")
    theirs = timm_layers.resample_abs_pos_embed(weight, [new_grid, new_grid], num_prefix_tokens=1)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_resampling_methods_differ_and_the_choice_is_logged(tmp_path):
    path, _ = pretrained_weights(tmp_path)
    grids, lines = {}, []
    for method in ("bilinear_corners", "bicubic_antialias", "bicubic"):
        model = build_finetune_model(finetune_config(path, f"finetune.posemb_resample={method}"), log=lines.append)
        grids[method] = model.pos_embed.weight.detach()[0, 1:]
        assert method in lines[-1] and "4x4 -> 8x8" in lines[-1], lines[-1]
    scale = grids["bicubic"].abs().mean()
    for a, b in (("bilinear_corners", "bicubic_antialias"), ("bicubic_antialias", "bicubic")):
        assert (grids[a] - grids[b]).abs().mean() > 1e-3 * scale, (a, b)
    with pytest.raises(ConfigError) as error:
        finetune_config(path, "finetune.posemb_resample=lanczos")
    assert error.value.key == "finetune.posemb_resample"


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


# ---------------------------------------------------------------------------------------------
# End to end through the engine: pretrained at 16 px, fine-tuned at 32 px on the demo digits.

SHAPE = ["model.name=B/16", "model.patch_size=4", "model.depth=2", "model.width=48", "model.mlp_dim=96",
         "model.heads=4", "model.num_classes=10", "model.dropout=0.0"]


def pretrain_on_digits(tmp_path):
    """A small ViT trained at 16 px on the digits training split (plain loop: the point of the test
    is what fine-tuning does with it), saved as exported weights."""
    from vitscale.data.datasets import digits_arrays, digits_split

    config = load_config(None, SHAPE + ["model.image_size=16", "model.representation_size=48", "engine.precision=fp32"])
    images, labels = digits_arrays(16)
    train, _ = digits_split(labels)
    x = torch.from_numpy(images[train]).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, 3, 16, 16) in [-1, 1]
    y = torch.from_numpy(labels[train])
    torch.manual_seed(0)
    model = build_model(config.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    for step in range(100):
        batch = torch.randint(0, len(x), (64,))
        loss = F.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return save_weights(tmp_path / "digits16.safetensors", model.state_dict(), config)


def run_engine(tmp_path, name, *overrides):
    import json
    import os
    import subprocess
    import sys

    from vitscale.data.datasets import write_digits_shards

    shards = tmp_path / "digits"
    if not shards.exists():
        write_digits_shards(shards, image_size=32)
    from test_engine_support import merge_overrides

    base = [*SHAPE, f"data.train_shards={shards}/train-{{000000..000005}}.tar",
            f"data.eval_shards={shards}/eval-{{000000..000001}}.tar", "data.crop_scale=[0.6,1.0]", "data.hflip=false",
            "data.num_workers=1", "metrics.port=0", f"run.output_dir={tmp_path}", f"run.name={name}", "run.steps=30",
            "run.log_every=1", "engine.micro_batch_size=32", "engine.global_batch_size=32", "engine.eval_every=0",
            "optim.lr=0.01", "model.image_size=32"]
    args = [sys.executable, "-m", "vitscale", "train", "--config", "configs/finetune_b16_384_tiny.yaml",
            *merge_overrides(base, overrides)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(args, cwd=root, capture_output=True, text=True, timeout=400,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r.get("loss") is not None]
    top1 = [r["eval"]["top1"] for r in records if "eval" in r][-1]
    return losses, top1


@pytest.mark.slow
def test_finetuning_at_new_resolution_improves_on_digits(tmp_path):
    import math

    from vitscale.engine.checkpoint import latest_complete, safe_torch_load

    weights = pretrain_on_digits(tmp_path)
    losses, top1 = run_engine(tmp_path, "finetuned", f"finetune.init_from={weights}")
    print(f"fine-tuned: loss {losses[0]:.4f} -> {sum(losses[-5:]) / 5:.4f}, held-out top1 {top1:.3f}")
    assert abs(losses[0] - math.log(10)) < 1e-3       # zero head: uniform predictions at step 1
    assert sum(losses[-5:]) / 5 < losses[0] - 0.3
    # Chance is 0.10, and the zero head starts there; measured 0.45 after 30 steps. The same
    # recipe from a random initialisation reached 0.09 (not rerun here, to save time).
    assert top1 > 0.35
    # The run's checkpoint holds the resampled 8x8 grid and the new head, no pre-logits.
    state = safe_torch_load(latest_complete(tmp_path / "finetuned") / "mp_rank_00_model_states.pt")["module"]
    assert state["pos_embed.weight"].shape == (1, 1 + 64, 48)
    assert state["head.weight"].shape == (10, 48) and not any(k.startswith("pre_logits") for k in state)
    # ... and is itself a starting point: on to 48 px from the checkpoint directory.
    from test_engine_support import merge_overrides

    config = load_config(None, merge_overrides(TINY, SHAPE) + ["model.image_size=48", "model.head=finetune",
                                               f"finetune.init_from={tmp_path / 'finetuned'}"])
    model = build_finetune_model(config)
    assert model.pos_embed.weight.shape == (1, 1 + 144, 48) and not model.head.weight.any()


def test_unusable_sources_are_named(tmp_path):
    from vitscale.errors import CheckpointError

    with pytest.raises(CheckpointError, match="not found"):
        build_finetune_model(finetune_config(tmp_path / "missing.safetensors"))
    (tmp_path / "run" / "checkpoints" / "step_00000010").mkdir(parents=True)  # interrupted save
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        build_finetune_model(finetune_config(tmp_path / "run"))


@pytest.mark.slow
def test_checkpoint_weights_are_the_fp32_master_weights(tmp_path):
    """From a bf16 ZeRO-2 checkpoint, fine-tuning starts from the fp32 master weights (the
    optimizer partitions), not the bf16 copy the module holds."""
    import os
    import subprocess
    import sys

    from vitscale.data.datasets import write_digits_shards
    from vitscale.engine.checkpoint import latest_complete, safe_torch_load
    from vitscale.interop.export import load_checkpoint_weights

    train_shards, _ = write_digits_shards(tmp_path / "digits", image_size=32)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-m", "vitscale", "train", "--config", "configs/ablations/base.yaml",
                           f"data.train_shards={train_shards}", "data.eval_shards=", "data.num_workers=1",
                           "metrics.port=0", f"run.output_dir={tmp_path}", "run.name=bf16", "run.steps=3",
                           "model.depth=1", "model.width=32", "model.mlp_dim=64", "engine.precision=bf16",
                           "engine.zero_stage=2", "engine.micro_batch_size=16", "engine.global_batch_size=16"],
                          cwd=root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert done.returncode == 0, done.stderr[-3000:]
    state, config = load_checkpoint_weights(tmp_path / "bf16")
    module = safe_torch_load(latest_complete(tmp_path / "bf16") / "mp_rank_00_model_states.pt")["module"]
    assert config.engine.precision == "bf16" and set(state) == set(module)
    weight = "blocks.0.mlp.fc1.weight"
    assert module[weight].dtype == torch.bfloat16 and state[weight].dtype == torch.float32
    torch.testing.assert_close(state[weight].to(torch.bfloat16), module[weight], rtol=0, atol=0)
    assert not torch.equal(state[weight], module[weight].float())  # fp32 detail beyond bf16
