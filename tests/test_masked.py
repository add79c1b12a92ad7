"""Masked patch prediction: corruption statistics (50% / 80-10-10), targets against loop-by-loop
references, the corrupted forward, and training (loss falls) for each of the paper's targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitscale.errors import ConfigError
from vitscale.model import ModelConfig, build_model
from vitscale.research.config import MaskedPatchConfig
from vitscale.research.masked import (MaskedPatchObjective, apply_corruption, downsized_targets,
                                      full_patch_targets, mean_color_targets, quantize_colors,
                                      sample_corruption)


def test_corruption_statistics_match_paper():
    generator = torch.Generator().manual_seed(0)
    batch, patches, draws = 128, 196, 20
    counts = {"selected": 0, "masked": 0, "randomised": 0, "kept": 0}
    same_image = 0
    for _ in range(draws):
        c = sample_corruption(batch, patches, generator=generator)
        # Exactly half of each image's patches, every draw.
        assert torch.equal(c.selected.sum(dim=1), torch.full((batch,), patches // 2))
        # The three outcomes partition the selected patches.
        assert torch.equal(c.masked | c.randomised | c.kept, c.selected)
        assert not (c.masked & c.randomised).any()
        for name in counts:
            counts[name] += int(getattr(c, name).sum())
        flat = torch.arange(batch * patches).view(batch, patches)
        assert not (c.source == flat).any(), "a patch replaced by itself is not 'another' patch"
        same_image += int(((c.source // patches) == (flat // patches)).sum())
    total = batch * patches * draws
    assert counts["selected"] / total == 0.5
    n = counts["selected"]
    # Binomial std of a fraction over n = 250,880 patches is ~0.0008; allow ~6 sigma.
    assert abs(counts["masked"] / n - 0.8) < 0.005
    assert abs(counts["randomised"] / n - 0.1) < 0.005
    assert abs(counts["kept"] / n - 0.1) < 0.005
    # Replacements come from anywhere in the batch, not just the same image.
    assert same_image / total < 3.0 / batch


def test_apply_corruption_replaces_exactly_the_chosen_patches():
    torch.manual_seed(1)
    embeddings = torch.randn(4, 9, 6)
    mask = torch.randn(6)
    c = sample_corruption(4, 9)
    out = apply_corruption(embeddings, c, mask)
    flat = embeddings.reshape(-1, 6)
    for b in range(4):
        for n in range(9):
            if c.masked[b, n]:
                expected = mask
            elif c.randomised[b, n]:
                expected = flat[c.source[b, n]]
            else:
                expected = embeddings[b, n]
            assert torch.equal(out[b, n], expected)


def test_targets_match_loop_references():
    rng = np.random.default_rng(0)
    images = rng.random((2, 3, 16, 16)).astype(np.float32)
    tensor = torch.from_numpy(images)
    patch = 8

    def colour_class(rgb):
        levels = [min(int(v * 8), 7) for v in rgb]
        return levels[0] * 64 + levels[1] * 8 + levels[2]

    mean_colour = mean_color_targets(tensor, patch)
    downsized = downsized_targets(tensor, patch, size=4)
    full = full_patch_targets(tensor, patch)
    for b in range(2):
        for row in range(2):
            for col in range(2):
                n = row * 2 + col
                block = images[b, :, row * 8:(row + 1) * 8, col * 8:(col + 1) * 8]  # (3, 8, 8)
                assert mean_colour[b, n] == colour_class(block.mean(axis=(1, 2)))
                for cell in range(16):
                    cy, cx = divmod(cell, 4)
                    sub = block[:, cy * 2:(cy + 1) * 2, cx * 2:(cx + 1) * 2]
                    assert downsized[b, n, cell] == colour_class(sub.mean(axis=(1, 2)))
                expected = np.transpose(block, (1, 2, 0)).reshape(-1) * 2 - 1
                np.testing.assert_allclose(full[b, n].numpy(), expected, atol=1e-6)
    assert quantize_colors(torch.tensor([[1.0, 0.0, 0.999]])).item() == 7 * 64 + 7


def test_corrupted_forward_uses_mask_embedding():
    """The [mask] embedding enters the encoder: it receives a gradient, and changing it changes
    the output of masked patches only through the model (not a no-op)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="B/16", image_size=16, patch_size=4, depth=1, width=32,
                                    mlp_dim=64, heads=2, num_classes=0))
    objective = MaskedPatchObjective(MaskedPatchConfig(target="mean_color"))
    head = objective.attach(model)
    assert any(p is head.mask_embedding for p in model.parameters()), "extra params must be the model's"
    loss, stats = objective.loss(model, torch.randn(4, 3, 16, 16))
    loss.backward()
    assert head.mask_embedding.grad is not None and head.mask_embedding.grad.abs().sum() > 0
    assert set(stats) == {"loss", "accuracy"} and np.isfinite(stats["loss"])


def test_loss_without_attach_is_a_clear_error():
    model = build_model(ModelConfig(name="B/16", image_size=16, patch_size=4, depth=1, width=32,
                                    mlp_dim=64, heads=2, num_classes=0))
    with pytest.raises(ConfigError, match="objective.attach"):
        MaskedPatchObjective(MaskedPatchConfig()).loss(model, torch.randn(1, 3, 16, 16))


def coloured_digits(count: int, seed: int) -> torch.Tensor:
    """scikit-learn's digits (8x8 scans) upsampled to 16x16 and tinted with a random colour per
    image, normalised to [-1, 1]: predicting a hidden patch's colour needs the visible ones."""
    from sklearn.datasets import load_digits

    digits = torch.from_numpy(load_digits().images[:count]).float() / 16.0  # (B, 8, 8) in [0, 1]
    generator = torch.Generator().manual_seed(seed)
    tint = torch.rand(count, 3, 1, 1, generator=generator) * 0.8 + 0.2
    background = torch.rand(count, 3, 1, 1, generator=generator) * 0.3
    grey = torch.nn.functional.interpolate(digits[:, None], size=16, mode="nearest")
    return (background + grey * tint).clamp(0, 1) * 2 - 1


def context_free_loss(objective: MaskedPatchObjective, images: torch.Tensor, patch_size: int) -> float:
    """The best loss without looking at the image: the entropy of the targets' marginal
    distribution (classification) or their variance around the mean patch (regression)."""
    targets = objective.targets(images, patch_size)
    if objective.config.target == "full_patch":
        return float(((targets - targets.mean(dim=(0, 1))) ** 2).mean())
    counts = torch.bincount(targets.reshape(-1), minlength=512).float()
    probs = counts[counts > 0] / counts.sum()
    return float(-(probs * probs.log()).sum())


@pytest.mark.parametrize("target", ["mean_color", "downsized", "full_patch"])
def test_loss_falls_for_each_target(target):
    torch.manual_seed(0)
    images = coloured_digits(256, seed=0)
    model = build_model(ModelConfig(name="B/16", image_size=16, patch_size=4, depth=2, width=64,
                                    mlp_dim=128, heads=4, num_classes=0, attention_backend="sdpa"))
    objective = MaskedPatchObjective(MaskedPatchConfig(target=target))
    objective.attach(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    losses = []
    for step in range(80):
        batch = images[(step * 32) % 256:(step * 32) % 256 + 32]
        loss, _ = objective.loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = np.mean(losses[:5]), np.mean(losses[-10:])
    baseline = context_free_loss(objective, images, patch_size=4)
    print(f"{target}: loss {first:.3f} -> {last:.3f} (context-free best {baseline:.3f})")
    assert last < 0.7 * first, (target, first, last)
    # Below what any predictor blind to the visible patches can reach: it uses the context.
    assert last < baseline, (target, last, baseline)
