"""The simplejpeg decode path against Pillow: identical full-size pixels, crops within the
resampler's rounding of torchvision's reference, and the same verdict and reason as the PIL path
for every damaged or unusual JPEG."""

from __future__ import annotations

import io

import numpy as np
import pytest
import simplejpeg
import torch
from PIL import Image

from vitscale.data.datasets import sample_photos
from vitscale.data.decode import Augment, SampleError, decode_image

from test_data_augment import torchvision_reference


def jpeg(pixels: np.ndarray, mode: str = "RGB", **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format="JPEG", **options)
    return buffer.getvalue()


PHOTO = sample_photos()[0][1]  # 427 x 640


@pytest.mark.parametrize("options", [dict(quality=90), dict(quality=95, subsampling=0),
                                     dict(quality=85, progressive=True), dict(mode="L")],
                         ids=["420", "444", "progressive", "gray"])
def test_full_decode_equals_pillows_pixels(options):
    data = jpeg(PHOTO, **options)
    # Both are libjpeg-turbo with the accurate integer IDCT and fancy upsampling: identical.
    np.testing.assert_array_equal(simplejpeg.decode_jpeg(data, colorspace="RGB"), decode_image(data))


@pytest.mark.parametrize("fast_decode", [False, True])
def test_random_resized_crop_matches_torchvision_reference(fast_decode):
    data = jpeg(np.asarray(Image.fromarray(PHOTO).resize((960, 640), Image.Resampling.BICUBIC)), quality=92)
    ours, pils = (Augment(64, train=True, fast_decode=fast_decode, jpeg_decoder=name) for name in ("simplejpeg", "pil"))
    for seed in range(8):
        reference = torchvision_reference(data, seed, 64).to(torch.int16)
        error = (ours(data, seed).to(torch.int16) - reference).abs().float().mean().item()
        pil_error = (pils(data, seed).to(torch.int16) - reference).abs().float().mean().item()
        # Full decode: the same box, only tensor vs PIL antialiasing differ. Scaled decode: the
        # DCT-domain downscaling error of this detailed photo (up to ~2.6 levels), no more than
        # PIL's draft path has; a wrong box or flip would differ by tens of levels.
        assert error < (0.5 if not fast_decode else 3.0) and error <= pil_error + 0.25, (seed, error, pil_error)


def outcome(augment: Augment, data: bytes, seed: int = 3):
    try:
        return augment(data, seed)
    except SampleError as error:
        return error.reason


def cmyk_jpeg() -> bytes:
    return jpeg(PHOTO[:64, :64], mode="CMYK", quality=90)


def damaged_samples() -> dict[str, bytes]:
    good = jpeg(PHOTO, quality=90)
    start_of_scan = good.index(b"\xff\xda")
    return {
        "good": good,
        "gray": jpeg(PHOTO, mode="L"),
        "cmyk": cmyk_jpeg(),
        "progressive": jpeg(PHOTO, quality=80, progressive=True),
        "truncated": good[: len(good) // 2],
        "header_only": good[:start_of_scan],
        "garbage_after_header": good[: start_of_scan + 40] + bytes(range(256)) * 8,
        "bit_flips": bytes(b ^ 0x55 if i % 97 == 0 and i > start_of_scan + 20 else b for i, b in enumerate(good)),
        "not_a_jpeg": b"\xff\xd8\xff" + b"\x00" * 64,
        "oversized": jpeg(np.zeros((300, 400, 3), np.uint8)),
    }


@pytest.mark.parametrize("kind", list(damaged_samples()))
def test_same_verdict_and_reason_as_the_pil_path(kind):
    data = damaged_samples()[kind]
    settings = dict(image_size=32, train=True, max_pixels=300 * 399 if kind == "oversized" else 8192 * 8192)
    ours = outcome(Augment(**settings, jpeg_decoder="simplejpeg"), data)
    theirs = outcome(Augment(**settings, jpeg_decoder="pil"), data)
    if isinstance(theirs, str):
        assert ours == theirs, (kind, ours, theirs)
    else:
        assert isinstance(ours, torch.Tensor), (kind, ours)
        assert (ours.to(torch.int16) - theirs.to(torch.int16)).abs().float().mean() < 3.0, kind


def test_cmyk_takes_the_pil_path_and_keeps_adobes_colours():
    data = cmyk_jpeg()
    ours = Augment(64, train=False, jpeg_decoder="simplejpeg")(data, 0)
    expected = torch.from_numpy(np.array(decode_image(data))).permute(2, 0, 1)
    assert torch.equal(ours, expected)


def test_same_seed_same_pixels():
    augment = Augment(64, train=True, jpeg_decoder="simplejpeg")
    data = jpeg(PHOTO, quality=90)
    assert torch.equal(augment(data, 11), augment(data, 11))
    assert not torch.equal(augment(data, 11), augment(data, 12))
