"""A tiny ViT trained with model.attention_backend=triton (interpreted on CPU) follows the same
loss curve as the einsum reference backend, and `auto` resolves as documented."""

import json
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import vitscale.kernels.triton_attention as fa  # noqa: E402
from vitscale.kernels import preferred_backend, selection  # noqa: E402
from vitscale.model.attention import attention  # noqa: E402
from vitscale.model.config import ModelConfig  # noqa: E402
from vitscale.model.vit import build_model  # noqa: E402

if not torch.cuda.is_available() and not fa.INTERPRETING:
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1 at import time", allow_module_level=True)


def train_losses(backend: str, steps: int = 4) -> list[float]:
    """Four AdamW steps of a 2-block ViT (17 tokens, head dim 48 = 32 + 16) on fixed data."""
    torch.manual_seed(0)
    config = ModelConfig(name="Ti/8", image_size=32, depth=2, width=96, mlp_dim=192, heads=2, num_classes=10,
                         attention_backend=backend)
    model = build_model(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    generator = torch.Generator().manual_seed(1)
    images, labels = torch.randn(4, 3, 32, 32, generator=generator), torch.randint(0, 10, (4,), generator=generator)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_triton_backend_trains_like_math():
    math_losses, triton_losses = train_losses("math"), train_losses("triton")
    assert math_losses[-1] < math_losses[0]  # the steps do something
    assert triton_losses == pytest.approx(math_losses, rel=1e-4, abs=1e-5)


def test_auto_backend_on_cpu_is_sdpa():
    q = torch.randn(1, 2, 17, 32)
    assert preferred_backend(q) == "sdpa"
    expected = torch.softmax(q @ q.transpose(-1, -2) * 32 ** -0.5, -1) @ q
    torch.testing.assert_close(attention(q, q, q, backend="auto"), expected)


def test_choices_file_picks_the_measured_fastest(tmp_path, monkeypatch):
    path = tmp_path / "choices.json"
    monkeypatch.setenv(selection.CHOICES_ENV, str(path))
    entry = dict(device="cpu", dtype="float32", heads=2, tokens=197, head_dim=64,
                 fwd_ms={"sdpa": 2.0, "math": 1.0}, fwd_bwd_ms={"sdpa": 3.0, "math": 5.0})
    selection.save_choices([entry])
    assert json.loads(path.read_text())["entries"][0]["tokens"] == 197
    usable = ["math", "sdpa"]
    pick = lambda tokens, training, head_dim=64: selection.choose_backend(  # noqa: E731
        selection.load_choices(), device="cpu", dtype="float32", head_dim=head_dim, tokens=tokens,
        training=training, usable=usable)
    assert pick(200, training=False) == "math" and pick(200, training=True) == "sdpa"
    assert pick(200, training=True, head_dim=80) is None  # no entry for this head dim
    # Backends that are not usable here are skipped; a rewritten file is re-read.
    selection.save_choices([{**entry, "fwd_bwd_ms": {"flash": 0.5, "sdpa": 3.0}}])
    assert pick(197, training=True) == "sdpa"
    path.write_text("not json")
    assert preferred_backend(torch.zeros(1, 2, 197, 64)) == "sdpa"


def test_auto_backend_compiles_fullgraph_and_is_resolved_once_per_shape(tmp_path, monkeypatch):
    """Finding: `auto` looked at the choices file (os.stat) on every attention call, so
    torch.compile(fullgraph=True) failed and every layer graph-broke. It is now one choice per
    shape per process, traced as a constant."""
    import importlib

    from vitscale.model import ModelConfig, build_model

    attention_module = importlib.import_module("vitscale.model.attention")  # the package exports the function

    monkeypatch.setenv(selection.CHOICES_ENV, str(tmp_path / "choices.json"))
    monkeypatch.setattr(attention_module, "_RESOLVED", {})
    looked_up = []
    real_load = selection.load_choices
    monkeypatch.setattr(selection, "load_choices", lambda *a, **k: looked_up.append(1) or real_load(*a, **k))
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="Ti/4", image_size=16, depth=2, width=32, heads=2, mlp_dim=64,
                                    num_classes=10, attention_backend="auto"))
    images = torch.randn(2, 3, 16, 16)
    eager = model(images)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # a graph break would raise
    torch.testing.assert_close(compiled(images), eager)
    for _ in range(3):
        model(images)
    assert len(looked_up) == 1  # one shape: one look-up for the whole process
    assert attention_module.resolved_backends() == {"cpu float32 d=16 n=17 train": "sdpa"}
