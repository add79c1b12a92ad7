"""Engine units (one process, no DeepSpeed start-up): DeepSpeed JSON derivation, weight-decay
groups, the skip guard, schedules, objectives, evaluation counts, launcher environment."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from vitscale.config import load_config
from vitscale.engine.ds_config import deepspeed_config, fill_bucket_sizes, read_ds_json, resolve_zero_stage
from vitscale.objectives import build_objective, sigmoid_cross_entropy
from vitscale.engine.optim import build_optimizer, learning_rate, parameter_groups, step_unless
from vitscale.errors import ConfigError
from vitscale.model import ModelConfig, build_model

from test_engine_support import REPO

TINY_CONFIGS = ["vit_b16_i21k_tiny.yaml", "vit_l16_i21k_tiny.yaml", "vit_h14_jft_tiny.yaml", "demo.yaml"]


# ---------------------------------------------------------------------------------------------
# DeepSpeed JSON <-> config tree.


@pytest.mark.parametrize("json_name", ["zero1.json", "zero2.json", "zero3.json", "zero2_offload.json"])
@pytest.mark.parametrize("yaml_name", TINY_CONFIGS)
def test_shipped_json_files_fill_from_every_tiny_config(json_name, yaml_name):
    config = load_config(REPO / "configs" / yaml_name)
    ds_json = read_ds_json(REPO / "configs" / json_name)
    resolve_zero_stage(config, ds_json, stage_set_explicitly=False)
    world = 2
    ds = fill_bucket_sizes(deepspeed_config(config, world, ds_json), 12345)
    engine = config.engine
    assert ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world == ds["train_batch_size"]
    assert ds["train_batch_size"] == engine.global_batch_size
    assert ds["zero_optimization"]["stage"] == engine.zero_stage == int(json_name[4])
    assert ds["bf16"]["enabled"] == (engine.precision == "bf16") and ds["gradient_clipping"] == config.optim.grad_clip
    assert "//" not in ds and "auto" not in json.dumps(ds)
    assert ds["zero_optimization"].get("reduce_bucket_size", 12345) == 12345


def test_model_state_formula_reproduces_the_zero_paper_and_buckets_scale_with_the_model():
    """ZeRO paper, Figure 1: 7.5 B parameters, mixed precision (2 + 2 bytes, K = 12), 64 GPUs:
    120 GB without ZeRO, 31.4 GB (P_os), 16.6 GB (P_os+g), 1.9 GB (P_os+g+p) per GPU."""
    from vitscale.engine.ds_config import (auto_bucket_elements, auto_live_parameters,
                                           model_state_bytes_per_parameter)

    per_gpu = [7.5e9 * model_state_bytes_per_parameter(stage, 64, weight_bytes=2, gradient_bytes=2) / 1e9
               for stage in (0, 1, 2, 3)]
    assert per_gpu == pytest.approx([120, 31.4, 16.6, 1.88], abs=0.05)
    # ViT-H/14 (632 M): 1/64 of the model per bucket, two encoder blocks live under ZeRO-3.
    zero = fill_bucket_sizes({"zero_optimization": {"reduce_bucket_size": "auto", "stage3_max_live_parameters": "auto",
                                                    "allgather_bucket_size": 7}}, 632_000_000)["zero_optimization"]
    assert zero == {"reduce_bucket_size": 9_875_000, "stage3_max_live_parameters": 39_500_000,
                    "allgather_bucket_size": 7}
    assert auto_bucket_elements(1000) == 1000 and auto_bucket_elements(10**12) == 500_000_000
    assert auto_live_parameters(10**12) == 10**9 and auto_bucket_elements(22_000_000) == 1 << 22


def test_accumulation_is_derived_and_explicit_values_must_agree():
    config = load_config(REPO / "configs" / "demo.yaml", ["engine.micro_batch_size=8", "engine.global_batch_size=64"])
    assert deepspeed_config(config, 2)["gradient_accumulation_steps"] == 4
    assert deepspeed_config(config, 2, {"gradient_accumulation_steps": 4, "train_batch_size": 64})
    with pytest.raises(ConfigError, match="gradient_accumulation_steps=2 in the DeepSpeed JSON disagrees"):
        deepspeed_config(config, 2, {"gradient_accumulation_steps": 2})
    with pytest.raises(ConfigError, match="gradient_clipping=0.5 in the DeepSpeed JSON disagrees with optim.grad_clip"):
        deepspeed_config(config, 2, {"gradient_clipping": 0.5})
    with pytest.raises(ConfigError, match=r"bf16.enabled=True in the DeepSpeed JSON disagrees"):
        deepspeed_config(config, 2, {"bf16": {"enabled": True}})  # demo.yaml trains in fp32
    with pytest.raises(ConfigError, match="not divisible by micro-batch 8 x world size 3 = 24"):
        deepspeed_config(config, 3)
    with pytest.raises(ConfigError, match="'optimizer' section"):
        deepspeed_config(config, 2, {"optimizer": {"type": "Adam"}})


def test_zero_stage_comes_from_the_json_unless_overridden_differently():
    config = load_config(REPO / "configs" / "demo.yaml")
    resolve_zero_stage(config, {"zero_optimization": {"stage": 3}}, stage_set_explicitly=False)
    assert config.engine.zero_stage == 3
    config = load_config(REPO / "configs" / "demo.yaml", ["engine.zero_stage=1"])
    with pytest.raises(ConfigError, match="engine.zero_stage: 1 disagrees with stage 3"):
        resolve_zero_stage(config, {"zero_optimization": {"stage": 3}}, stage_set_explicitly=True)


def test_offload_json_allows_our_optimizer():
    config = load_config(REPO / "configs" / "demo.yaml")
    ds = deepspeed_config(config, 2, read_ds_json(REPO / "configs" / "zero2_offload.json"))
    assert ds["zero_force_ds_cpu_optimizer"] is False
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


# ---------------------------------------------------------------------------------------------
# Optimizers and weight decay.


def tiny_model(**overrides):
    base = dict(name="Ti/4", image_size=16, depth=2, width=32, heads=2, mlp_dim=64, num_classes=10,
                representation_size=32)
    return build_model(ModelConfig(**{**base, **overrides}))


@pytest.mark.parametrize("variant", [{}, {"pos_embed": "learned_2d"}, {"pos_embed": "relative", "classifier": "gap"},
                                     {"classifier": "map"}])
def test_weight_decay_only_on_weight_matrices(variant):
    model = tiny_model(**variant)
    groups = {group["name"]: group for group in parameter_groups(model, 0.1)}
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in groups["decay"]["params"]}
    plain = {names[id(p)] for p in groups["no_decay"]["params"]}
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    assert decayed | plain == set(names.values()) and not decayed & plain
    for name in plain:
        assert (name.endswith(".bias") or "norm" in name or name.startswith(("cls_token", "pos_embed", "relative_bias"))
                or name == "pool.probe"), name
    expected_weights = {n for n, p in model.named_parameters() if n.endswith(".weight") and p.ndim == 2
                        and not n.startswith("pos_embed")} | {"patch_embed.proj.weight"}
    assert decayed == expected_weights


def test_adamw_decays_weights_but_not_embeddings_norms_or_biases():
    """With zero gradients, AdamW's step is exactly p <- p - lr * wd * p on decayed tensors and
    nothing on the others (the Adam term is 0 / (0 + eps))."""
    config = load_config(REPO / "configs" / "demo.yaml", ["optim.weight_decay=0.1", "optim.lr=0.01"])
    model = tiny_model()
    optimizer = build_optimizer(config.optim, model)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["betas"] == (0.9, 0.999)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, param in model.named_parameters():
        weight_matrix = name.endswith(".weight") and param.ndim >= 2 and not name.startswith("pos_embed")
        expected = before[name] * (1 - 0.01 * 0.1) if weight_matrix else before[name]
        assert torch.allclose(param, expected, rtol=0, atol=1e-7), name


def test_sgd_with_momentum_for_fine_tuning():
    config = load_config(REPO / "configs" / "demo.yaml", ["optim.name=sgd", "optim.weight_decay=0", "optim.lr=0.1"])
    model = tiny_model()
    optimizer = build_optimizer(config.optim, model)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0.9
    param = model.head.weight
    start = param.detach().clone()
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        optimizer.step()
    # buffer: 1, then 0.9 * 1 + 1 = 1.9; total step lr * (1 + 1.9)
    assert torch.allclose(param, start - 0.1 * 2.9, atol=1e-6)


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_device_flag_skips_update_and_state_even_on_the_first_step(name):
    """step_unless hands the flag to the fused kernel (found_inf): a skipped step leaves weights,
    moments and step counts exactly as they were, also when it is the very first step (fused SGD
    would otherwise keep an uninitialised momentum buffer), and a later real step is the one a
    fresh optimizer would take."""
    config = load_config(REPO / "configs" / "demo.yaml", [f"optim.name={name}"])
    model, twin = tiny_model(), tiny_model()
    twin.load_state_dict(model.state_dict())
    optimizer, reference = build_optimizer(config.optim, model), build_optimizer(config.optim, twin)
    assert optimizer.defaults["fused"]
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    step_unless(optimizer, torch.tensor(True))
    for name_, param in model.named_parameters():
        assert torch.equal(param, snapshot[name_]), name_
    for p, q in zip(model.parameters(), twin.parameters()):
        p.grad = torch.ones_like(p)
        q.grad = torch.ones_like(q)
    step_unless(optimizer, torch.tensor(False))
    reference.step()
    for (name_, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), name_
    for p, q in zip(model.parameters(), twin.parameters()):
        for key, value in reference.state[q].items():
            assert torch.equal(torch.as_tensor(optimizer.state[p][key]), torch.as_tensor(value)), key


# ---------------------------------------------------------------------------------------------
# Schedules.


def schedule(decay, warmup=10, total=110, end=0.1):
    return load_config(REPO / "configs" / "demo.yaml", [f"schedule.decay={decay}", f"schedule.warmup_steps={warmup}",
                                                         f"run.steps={total}", f"schedule.end_lr_ratio={end}",
                                                         "optim.lr=1.0"])


@pytest.mark.parametrize("decay", ["linear", "cosine", "constant"])
def test_warmup_then_decay(decay):
    config = schedule(decay)
    lrs = [learning_rate(step, config) for step in range(110)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])  # linear warmup to the peak
    assert lrs[10] == pytest.approx(1.0)
    progress = lambda step: (step - 10) / 100  # noqa: E731
    for step in (10, 35, 60, 85, 109):
        if decay == "linear":
            expected = 0.1 + 0.9 * (1 - progress(step))
        elif decay == "cosine":
            expected = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress(step)))
        else:
            expected = 1.0
        assert lrs[step] == pytest.approx(expected), step
    assert learning_rate(500, config) == pytest.approx(0.1 if decay != "constant" else 1.0)  # flat past the horizon


# ---------------------------------------------------------------------------------------------
# Objectives and evaluation counts.


def test_softmax_and_sigmoid_cross_entropy():
    model = tiny_model()
    images = torch.randn(4, 3, 16, 16)
    labels = torch.tensor([1, 2, 3, 4])
    single = build_objective(load_config(REPO / "configs" / "demo.yaml"))
    loss, _ = single.loss(model, images, labels)
    assert loss.item() == pytest.approx(F.cross_entropy(model(images), labels).item(), rel=1e-6)

    multi = build_objective(load_config(REPO / "configs" / "demo.yaml", ["data.multi_label=true"]))
    targets = torch.zeros(4, 10)
    targets[0, [1, 3]] = 1
    targets[2, 7] = 1
    loss, _ = multi.loss(model, images, targets)
    p = torch.sigmoid(model(images).double())
    reference = -(targets * p.log() + (1 - targets) * (1 - p).log()).sum(dim=1).mean()  # summed over classes
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    assert sigmoid_cross_entropy(torch.zeros(2, 5), torch.zeros(2, 5)).item() == pytest.approx(5 * math.log(2))


def test_hole_weights_give_the_mean_over_real_samples_of_the_global_batch():
    """Two simulated ranks x two micro-batches with holes (padding, skipped samples): the weighted
    micro-batch losses, averaged over ranks and micro-batches as the engines average gradients, equal
    plain cross-entropy over the real samples alone, in value and in gradient."""
    from types import SimpleNamespace

    from vitscale.train import sample_weights

    torch.manual_seed(0)
    model = tiny_model()
    objective = build_objective(load_config(REPO / "configs" / "demo.yaml"))
    images, labels = torch.randn(2, 2, 4, 3, 16, 16), torch.randint(0, 10, (2, 2, 4))
    valid = torch.tensor([[[1, 1, 0, 1], [0, 0, 0, 0]], [[1, 1, 1, 1], [1, 0, 1, 1]]], dtype=torch.bool)
    images[~valid] = 100.0  # a hole's content must not reach the loss or the gradient
    global_real = valid.sum().float()

    class TwoRanks:  # device_sum over both simulated ranks: each rank's masks are its own
        world_size = 2

        @staticmethod
        def device_sum(local):
            return global_real.clone()

    engine = SimpleNamespace(device=torch.device("cpu"), comm=TwoRanks())
    total = 0.0
    for rank in range(2):
        weights = sample_weights(engine, list(valid[rank]))
        for micro in range(2):
            total = total + objective.loss(model, images[rank, micro], labels[rank, micro], weights[micro])[0] / 4
    total.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    reference = F.cross_entropy(model(images[valid]), labels[valid])
    reference.backward()
    assert total.item() == pytest.approx(reference.item(), rel=1e-5)
    for mine, theirs in zip(got, (p.grad for p in model.parameters())):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6)


def test_unknown_objective_is_a_config_error():
    config = load_config(REPO / "configs" / "demo.yaml")
    config.run.objective = "contrastive"
    with pytest.raises(ConfigError, match="run.objective"):
        build_objective(config)


def test_eval_counts_exclude_padding_and_score_precision_at_1():
    from vitscale.evaluation.top1 import batch_counts, evaluate_top1

    logits = torch.tensor([[0.1, 2.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0], [5.0, 0.0, 0.0]])
    labels = torch.tensor([1, 1, 2, 0])
    valid = torch.tensor([True, True, True, False])  # the last row pads the batch
    correct, count, loss_sum = batch_counts(logits, labels, valid).tolist()
    assert (correct, count) == (2, 3)
    assert loss_sum == pytest.approx(F.cross_entropy(logits[:3], labels[:3], reduction="sum").item())
    multi_hot = torch.tensor([[0, 1, 1], [0, 1, 0], [1, 0, 1], [1, 0, 0]], dtype=torch.float32)
    correct, count, _ = batch_counts(logits, multi_hot, valid).tolist()
    assert (correct, count) == (2, 3)  # top class among the labels: rows 0 and 2
    # The evaluator over a "model" that returns these logits: same counts, keys of the loop's log.
    model = torch.nn.Linear(4, 3)
    model.forward = lambda images: logits  # type: ignore[method-assign]
    result = evaluate_top1(model, [(torch.zeros(4, 4), labels, valid)])
    assert result["top1"] == pytest.approx(2 / 3) and result["samples"] == 3
    assert result["loss"] == pytest.approx(F.cross_entropy(logits[:3], labels[:3]).item())
    assert evaluate_top1(model, [(torch.zeros(4, 4), multi_hot, valid)])["prec@1"] == pytest.approx(2 / 3)


def test_launch_environment_from_slurm_without_torchrun(monkeypatch):
    from vitscale.train import Launch

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        # from_environment writes these into os.environ; set-then-delete makes monkeypatch
        # restore their absence afterwards, so later tests' subprocesses don't inherit rank 5 of 8.
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("MASTER_ADDR", "node1")
    assert Launch.from_environment() == Launch(rank=5, local_rank=1, world_size=8, job_id="77")
