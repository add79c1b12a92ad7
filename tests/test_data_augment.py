"""The decode + augment path against torchvision's own transforms on the full-size decode:
same crop boxes and flips from the same seed, pixels within rounding (and within JPEG's reduced-
size decoding error on the fast path)."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as F
from torchvision.transforms import RandomResizedCrop

from vitscale.data.datasets import sample_photos
from vitscale.data.decode import Augment


def photo_jpeg(width, height):
    _, pixels = sample_photos()[1]
    buffer = io.BytesIO()
    Image.fromarray(pixels).resize((width, height), Image.Resampling.BICUBIC).save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def torchvision_reference(data: bytes, seed: int, size: int) -> torch.Tensor:
    """RandomResizedCrop + flip on the full decode, drawing from the same seeded generator."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        top, left, h, w = RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3])
        flip = bool(torch.rand(()) < 0.5)
    out = F.pil_to_tensor(F.resized_crop(image, top, left, h, w, [size, size]))
    return out.flip(-1) if flip else out


@pytest.mark.parametrize("fast_decode", [False, True])
def test_random_resized_crop_matches_torchvision(fast_decode):
    data = photo_jpeg(960, 640)  # large enough for 1/2 and 1/4 reduced decodes at 64 px
    augment = Augment(64, train=True, fast_decode=fast_decode)
    errors = []
    for seed in range(8):
        ours = augment(data, seed).to(torch.int16)
        reference = torchvision_reference(data, seed, 64).to(torch.int16)
        assert ours.shape == reference.shape == (3, 64, 64)
        errors.append((ours - reference).abs().float().mean().item())
    # Exact path: PIL vs tensor antialiasing differ only by rounding. Fast path: DCT-domain
    # downscaling differs a little more; a wrong crop box would differ by tens of levels.
    assert max(errors) < (0.5 if not fast_decode else 2.0), errors


@pytest.mark.parametrize("width,height", [(500, 375), (333, 501)])
def test_fast_decode_of_sizes_not_divisible_by_the_dct_block_matches_torchvision(width, height):
    # 500x375 decodes at 1/8 to 63x47 (rounded up): a box scaled by 63/500 overruns the height.
    data = photo_jpeg(width, height)
    augment = Augment(16, train=True, fast_decode=True)
    for seed in range(64):
        ours = augment(data, seed).to(torch.int16)
        reference = torchvision_reference(data, seed, 16).to(torch.int16)
        assert (ours - reference).abs().float().mean() < 12.0, seed


def test_eval_transform_is_a_centre_crop():
    data = photo_jpeg(640, 427)
    ours = Augment(128, train=False, fast_decode=False)(data, 0).to(torch.int16)
    image = Image.open(io.BytesIO(data)).convert("RGB")
    reference = F.pil_to_tensor(F.resize(F.center_crop(image, [427, 427]), [128, 128])).to(torch.int16)
    assert (ours - reference).abs().float().mean() < 1.0


def test_same_seed_same_pixels_different_seed_different_crop():
    augment = Augment(64, train=True)
    data = photo_jpeg(500, 375)
    assert torch.equal(augment(data, 7), augment(data, 7))
    assert not torch.equal(augment(data, 7), augment(data, 8))
