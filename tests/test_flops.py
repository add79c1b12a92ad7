"""FLOPs accounting against torch's FlopCounterMode, and the peak table for MFU."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vitscale.bench.peaks import lookup_peak_tflops, peak_flops
from vitscale.errors import ConfigError
from vitscale.model.config import ModelConfig
from vitscale.model.flops import forward_flops_per_image, training_flops_per_image
from vitscale.model.vit import build_model


def counted_flops(config: ModelConfig, *, backward: bool, batch: int = 2) -> float:
    """FlopCounterMode's count per image, on the meta device (no memory, no compute)."""
    with torch.device("meta"):
        model = build_model(config)
        images = torch.randn(batch, config.in_channels, config.image_size, config.image_size)
    with FlopCounterMode(display=False) as counter:
        logits = model(images)
        if backward:
            logits.sum().backward()
    return counter.get_total_flops() / batch


@pytest.mark.parametrize("name,image_size,extra", [
    ("B/16", 224, {}), ("L/16", 224, {}), ("H/14", 224, {}),
    ("B/16", 384, {"representation_size": 768}),
    ("S/16", 224, {"classifier": "gap", "num_classes": 1000, "head": "finetune"}),
    ("Ti/16", 224, {"classifier": "map", "num_classes": 0}),
])
def test_forward_flops_match_flop_counter(name, image_size, extra):
    config = ModelConfig(name=name, image_size=image_size, attention_backend="sdpa", **extra)
    ours, counted = forward_flops_per_image(config), counted_flops(config, backward=False)
    assert ours == pytest.approx(counted, rel=0.01)


@pytest.mark.parametrize("name", ["B/16", "H/14"])
def test_training_flops_match_flop_counter(name):
    """The 3x convention over-counts only the patch embedding's input gradient (never computed)."""
    config = ModelConfig(name=name, attention_backend="sdpa")
    assert training_flops_per_image(config) == pytest.approx(counted_flops(config, backward=True), rel=0.01)


def test_known_values():
    # ViT-B/16 at 224: 17.56 GFLOPs of multiply-adds x2 is the number usually quoted as "17.6 GFLOPs".
    b16 = forward_flops_per_image(ModelConfig(name="B/16", num_classes=1000))
    assert 35.0e9 < b16 < 35.3e9


def test_peaks_match_device_names():
    assert lookup_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert lookup_peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert lookup_peak_tflops("NVIDIA A100-SXM4-80GB", "bfloat16") == 312.0
    assert lookup_peak_tflops("NVIDIA L40S", "fp16") == 362.0
    assert lookup_peak_tflops("NVIDIA L4", "bf16") == 121.0
    assert lookup_peak_tflops("Some Future GPU", "bf16") is None
    assert peak_flops(torch.device("cpu"), "bf16", None) is None
    assert peak_flops(torch.device("cpu"), "bf16", 1e12) == 1e12
    with pytest.raises(ConfigError):
        peak_flops(torch.device("cpu"), "bf16", -1.0)
    with pytest.raises(ConfigError):
        lookup_peak_tflops("NVIDIA H100", "int3")
