"""SAM / GSAM: one step against a hand-computed reference (closed-form least squares), against an
independent torch.func implementation on a tiny ViT, the rho schedule, exact restoration, the
config rules (ZeRO-3 and fp16 rejected), and through DeepSpeed ZeRO 0/1/2 (also with gradient
accumulation) against plain PyTorch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch.func import functional_call, grad

from vitscale.config import load_config
from vitscale.errors import ConfigError
from vitscale.model import ModelConfig, build_model
from vitscale.research.sam import (SharpnessSettings, sharpness_aware_backward, sharpness_aware_gradients,
                                   settings_from_config)


def least_squares_reference(X, y, w, b, *, rho, alpha, lr):
    """f(w, b) = mean((X w + b - y)^2) / 2, every gradient written out by hand."""
    n = len(y)

    def gradient(w, b):
        r = X @ w + b - y
        return X.T @ r / n, np.array([r.sum() / n])

    gw, gb = gradient(w, b)
    norm = np.sqrt(gw @ gw + gb @ gb)
    w_adv, b_adv = w + rho * gw / norm, b + rho * gb / norm
    aw, ab = gradient(w_adv, b_adv)
    adv_norm = np.sqrt(aw @ aw + ab @ ab)
    projection = (gw @ aw + gb @ ab) / adv_norm            # <g, g_adv/||g_adv||>
    perp_w, perp_b = gw - projection * aw / adv_norm, gb - projection * ab / adv_norm
    uw, ub = aw - alpha * perp_w, ab - alpha * perp_b
    return w - lr * uw, b - lr * ub


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_step_matches_hand_computed_reference(alpha):
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(16, 3)), rng.normal(size=16)
    w0, b0 = rng.normal(size=3), np.array([0.3])
    rho, lr = 0.2, 0.1
    expected_w, expected_b = least_squares_reference(X, y, w0, b0, rho=rho, alpha=alpha, lr=lr)

    w = torch.tensor(w0, requires_grad=True)
    b = torch.tensor(b0, requires_grad=True)
    Xt, yt = torch.tensor(X), torch.tensor(y)
    optimizer = torch.optim.SGD([w, b], lr=lr)
    stats = sharpness_aware_backward(lambda: ((Xt @ w + b - yt) ** 2).mean() / 2, [w, b],
                                     lambda loss: loss.backward(), rho=rho, alpha=alpha)
    optimizer.step()
    np.testing.assert_allclose(w.detach().numpy(), expected_w, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(b.detach().numpy(), expected_b, rtol=1e-12, atol=1e-12)
    assert stats["surrogate_gap"] > 0  # ascending along the gradient raises the loss


def tiny_vit(**overrides):
    config = dict(name="B/16", image_size=16, patch_size=8, depth=2, width=16, mlp_dim=32, heads=2,
                  num_classes=3, attention_backend="math")
    return build_model(ModelConfig(**{**config, **overrides})).double()


def torch_func_gsam(model, images, labels, *, rho, alpha):
    """big_vision's gsam_gradient written functionally over a parameter dict."""
    params = {k: v.detach().clone() for k, v in model.named_parameters()}

    def loss(p):
        return torch.nn.functional.cross_entropy(functional_call(model, p, (images,)), labels)

    g = grad(loss)(params)
    norm = torch.sqrt(sum((t ** 2).sum() for t in g.values()))
    g_adv = grad(loss)({k: params[k] + rho * g[k] / norm for k in params})
    adv_norm = torch.sqrt(sum((t ** 2).sum() for t in g_adv.values()))
    projection = sum((g[k] * g_adv[k]).sum() for k in params) / adv_norm
    return {k: g_adv[k] - alpha * (g[k] - projection * g_adv[k] / adv_norm) for k in params}


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_tiny_vit_matches_functional_reference(alpha):
    torch.manual_seed(0)
    model = tiny_vit()
    with torch.no_grad():  # the fine-tuning-style zero head would make every gradient trivial
        model.head.weight.normal_(std=0.5)
    images, labels = torch.randn(4, 3, 16, 16, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    expected = torch_func_gsam(model, images, labels, rho=0.05, alpha=alpha)
    names, params = zip(*model.named_parameters())
    loss_fn = lambda: torch.nn.functional.cross_entropy(model(images), labels)  # noqa: E731
    update, stats = sharpness_aware_gradients(loss_fn, params, rho=0.05, alpha=alpha)
    for name, u in zip(names, update):
        torch.testing.assert_close(u, expected[name], rtol=1e-9, atol=1e-12, msg=name)
    for name, p in model.named_parameters():  # perturbation undone exactly
        assert torch.equal(p, before[name]), name
    assert stats["rho"] == 0.05 and stats["perturbed_loss"] > stats["loss"]


def test_both_passes_see_the_same_dropout():
    torch.manual_seed(0)
    model = tiny_vit(dropout=0.5, drop_path=0.5).train()
    images, labels = torch.randn(4, 3, 16, 16, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    loss_fn = lambda: torch.nn.functional.cross_entropy(model(images), labels)  # noqa: E731
    _, stats = sharpness_aware_gradients(loss_fn, list(model.parameters()), rho=0.0, alpha=0.0)
    assert stats["perturbed_loss"] == stats["loss"]


def test_rho_follows_the_learning_rate():
    gsam = SharpnessSettings(rho_max=0.6, rho_min=0.1, alpha=0.4, lr_max=1e-3, lr_min=1e-5)
    assert gsam.rho(1e-3) == pytest.approx(0.6) and gsam.rho(1e-5) == pytest.approx(0.1)
    assert gsam.rho(0.505e-3) == pytest.approx(0.35)
    assert gsam.rho(1e-7) == pytest.approx(0.1)  # early warmup, below lr_min
    config = load_config(None, ["optim.name=gsam", "optim.rho=0.6", "optim.rho_min=0.1", "optim.lr=1e-3",
                                "schedule.end_lr_ratio=0.01"])
    settings = settings_from_config(config)
    assert (settings.rho_max, settings.rho_min, settings.alpha, settings.lr_min) == (0.6, 0.1, 0.4, 1e-5)
    sam = settings_from_config(load_config(None, ["optim.name=sam", "optim.rho=0.05"]))
    assert sam.alpha == 0.0 and sam.rho(1e-9) == sam.rho(1.0) == 0.05


@pytest.mark.parametrize("overrides,key", [
    (["optim.name=gsam", "engine.zero_stage=3"], "engine.zero_stage"),
    (["optim.name=sam", "engine.precision=fp16"], "engine.precision"),
    (["optim.name=gsam", "optim.rho=0.1", "optim.rho_min=0.2"], "optim.rho_min"),
    (["optim.name=adam"], "optim.name"),
])
def test_config_rules(overrides, key):
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert error.value.key == key
    for stage in (0, 1, 2):
        load_config(None, ["optim.name=gsam", f"engine.zero_stage={stage}"])


DEEPSPEED_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import deepspeed, torch
    from vitscale.research.sam import sharpness_aware_backward

    torch.manual_seed(0)
    def net():
        return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    reference, x, y = net(), torch.randn(2, 4, 4), torch.randn(2, 4, 2)
    results = {"initial": [p.detach().flatten().tolist() for p in reference.parameters()]}
    for stage in (-1, 0, 1, 2):   # -1: plain PyTorch SGD, the reference
        model = net()
        model.load_state_dict(reference.state_dict())
        if stage < 0:
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            module, backward, step = model, lambda loss: loss.backward(), optimizer.step
        else:
            config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
                      "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
                      "gradient_clipping": 0.0,  # DeepSpeed 0.19 clips at 1.0 unless told
                      "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}
            engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
            # The two local passes run on the bare module: engine forwards arm DeepSpeed's
            # reduction hooks, which must fire only for the final surrogate backward.
            module, backward, step = engine.module, engine.backward, engine.step
        for i in range(2):
            loss_fn = lambda: ((module(x[i]) - y[i]) ** 2).mean()
            sharpness_aware_backward(loss_fn, list(module.parameters()), backward, rho=0.1, alpha=0.3)
            step()
            if stage < 0:
                optimizer.zero_grad()
        results[stage] = [p.detach().flatten().tolist() for p in module.parameters()]

    # Gradient accumulation (2 micro-batches per step): each micro-batch gets its own perturbation
    # and the engine averages the two SAM/GSAM directions, as the plain loop does by hand.
    for accumulate in ("plain", "zero2"):
        model = net()
        model.load_state_dict(reference.state_dict())
        if accumulate == "plain":
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            module, backward, step = model, lambda loss: (loss / 2).backward(), lambda: None
        else:
            config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
                      "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
                      "gradient_clipping": 0.0, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}
            engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
            module, backward, step = engine.module, engine.backward, engine.step
        for i in range(2):
            loss_fn = lambda: ((module(x[i]) - y[i]) ** 2).mean()
            sharpness_aware_backward(loss_fn, list(module.parameters()), backward, rho=0.1, alpha=0.3)
            step()  # DeepSpeed updates at the accumulation boundary only
        if accumulate == "plain":
            optimizer.step()
        results["accumulate_" + accumulate] = [p.detach().flatten().tolist() for p in module.parameters()]
    json.dump(results, open(sys.argv[1], "w"))
""")


@pytest.mark.slow
def test_deepspeed_zero_stages_match_plain_pytorch(tmp_path):
    out = tmp_path / "params.json"
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    done = subprocess.run([sys.executable, "-c", DEEPSPEED_SCRIPT, str(out)], env=env, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    reference, initial = results.pop("-1"), results.pop("initial")
    plain, zero2 = results.pop("accumulate_plain"), results.pop("accumulate_zero2")
    assert max(abs(a - b) for p, q in zip(plain, initial) for a, b in zip(p, q)) > 1e-3
    for got, want in zip(zero2, plain):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg="ZeRO-2 with accumulation")
    assert max(abs(a - b) for p, q in zip(reference, initial) for a, b in zip(p, q)) > 1e-3
    for stage, params in results.items():
        for got, want in zip(params, reference):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"ZeRO stage {stage}")


def test_zero3_from_the_deepspeed_json_is_rejected_before_training(monkeypatch):
    """The stage may come from --ds_config rather than the tree; the check runs after it is read."""
    import argparse

    from vitscale import train

    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    args = parser.parse_args(["--ds_config", "configs/zero3.json", "optim.name=sam"])
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with pytest.raises(ConfigError) as error:
        train.prepare(args)
    assert error.value.key == "engine.zero_stage" and "ZeRO-3" in str(error.value)


def test_logged_loss_is_the_clean_loss(tmp_path):
    """A SAM run's step-1 loss in log.jsonl is f(w) of the initial weights on the first batch, the
    same number a plain AdamW run (and plain PyTorch) logs there, not f(w + e); from step 2 on
    the weights differ, so the curves part."""
    from test_train import STEPS, plain_pytorch_losses, run_synthetic

    reference = plain_pytorch_losses(STEPS)
    sam = run_synthetic(tmp_path, "sam", 1, "engine.kind=local", "optim.name=sam", "optim.rho=0.5")
    assert sam[0] == pytest.approx(reference[0], rel=1e-6)
    assert abs(sam[1] - reference[1]) > 1e-4
