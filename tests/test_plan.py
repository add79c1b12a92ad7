"""`vitscale plan` against independent references: DeepSpeed's own memory estimators, the bytes a
2-rank DeepSpeed run allocates, and torch's MemTracker over a real forward + backward."""

import json

import pytest
import torch

from vitscale.cli import main
from vitscale.config import load_config
from vitscale.plan.activations import activation_bytes
from vitscale.plan.estimate import GIB, Hardware, ParameterCounts, make_plan

H100 = Hardware.named("h100")


def memory_rows(plan):
    return {row["engine"]: row for row in plan["memory"]}


def test_model_states_equal_deepspeeds_estimators():
    """DeepSpeed ships estimators for ZeRO-2 and ZeRO-3 (bf16 weights, no offload). ZeRO-2's 18
    bytes per parameter over the ranks are 16-bit gradients, the fp32 master copy, Adam's two
    moments and the fp32 copy of the gradient partition the step makes (in the plan's transient
    buffers); ZeRO-3's assume fp32 gradient accumulation (data_types.grad_accum_dtype) and add 4
    bytes per parameter of the largest layer, which the plan replaces by the live-parameter limit."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage3 import model_to_params as zero3_params
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    config = load_config("configs/vit_b16_i21k.yaml", ["model.name=S/16", "engine.micro_batch_size=8"])
    gpus = 32
    with torch.device("cpu"):
        from vitscale.model.vit import build_model

        model = build_model(config.model)
    total, largest_layer = zero3_params(model)
    counts = ParameterCounts.of(config.model)
    assert (counts.total, counts.largest_module) == (total, largest_layer)

    plan = make_plan(config, H100, gpus, 0.4)
    _, zero2 = estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=8, num_nodes=4, cpu_offload=False)
    step_copy = 4 * total / gpus
    assert memory_rows(plan)["deepspeed ZeRO-2"]["model_states"] + step_copy == pytest.approx(zero2, abs=1)

    fp32_gradients = {"zero_optimization": {"stage": 3}, "data_types": {"grad_accum_dtype": "fp32"}}
    plan3 = make_plan(config, H100, gpus, 0.4, fp32_gradients)
    _, zero3, largest_layer_bytes = estimate_zero3_model_states_mem_needs(
        total, largest_layer, num_gpus_per_node=8, num_nodes=4, cpu_offload=False, cpu_offload_params=False)
    assert memory_rows(plan3)["deepspeed ZeRO-3"]["model_states"] == pytest.approx(zero3 - largest_layer_bytes, abs=1)


@pytest.mark.slow
def test_model_states_match_what_two_deepspeed_ranks_allocate(tmp_path):
    """S/16 (22 M parameters), fp32, 2 CPU ranks, two micro-batches per step: the bytes of the
    engine's live tensors between the micro-batches (weights, gradients or their partitions,
    master copy, Adam moments, buckets) for ZeRO-1/2/3 and FSDP2, against the plan's model states
    + held buffers within 5%; the peak over the step stays within the plan's total (+5%)."""
    from vitscale.engine.ds_config import auto_bucket_elements

    out = tmp_path / "zero.json"
    assert main(["bench", "zero-memory", "--model", "S/16", "--stages", "1,2,3,fsdp2", "--steps", "1",
                 "--json", str(out)]) == 0
    measured = {row["stage"]: row for row in json.loads(out.read_text())["rows"]}
    for stage in (1, 2, 3, "fsdp2"):
        engine = ["engine.kind=fsdp2"] if stage == "fsdp2" else [f"engine.zero_stage={stage}"]
        config = load_config(None, ["model.name=S/16", "model.image_size=32", "model.num_classes=1000",
                                    "model.representation_size=null", "engine.precision=fp32", *engine,
                                    "engine.micro_batch_size=1", "engine.global_batch_size=4"])
        row = memory_rows(make_plan(config, H100, 2, 0.4))["fsdp2" if stage == "fsdp2" else f"deepspeed ZeRO-{stage}"]
        parameters = measured[stage]["parameters"]
        predicted = (row["model_states"] + row["buffers_held"]) / parameters
        assert measured[stage]["window"] == pytest.approx(predicted, rel=0.05), (stage, measured[stage], row)
        bound = (row["model_states"] + row["buffers_held"] + row["buffers_transient"]) / parameters
        assert measured[stage]["measured"] <= 1.05 * bound, (stage, measured[stage], row)
    assert measured[3]["window"] < measured[2]["window"] < measured[1]["window"]
    # Between steps ZeRO-2 holds fp32 weights (4 B) plus 1/N of the gradients (kept for the next
    # accumulation window), the master copy and the moments (16 B / 2 ranks); its buckets are the
    # engine's "auto" size, 2^22 elements for this model.
    assert measured[2]["held"] == pytest.approx(4 + 16 / 2, rel=0.02)
    assert measured[2]["buckets"]["reduce_bucket_size"] == auto_bucket_elements(parameters) == 1 << 22


SHAPES = [  # (overrides, micro-batch): fused attention; dropout + GAP; math attention (N^2) + pre-logits
    (["model.name=Ti/16", "model.depth=3", "model.num_classes=100"], 8),
    (["model.name=S/8", "model.depth=2", "model.image_size=96", "model.classifier=gap", "model.dropout=0.1",
      "model.num_classes=1000"], 16),
    (["model.name=B/16", "model.depth=2", "model.width=256", "model.heads=4", "model.mlp_dim=1024",
      "model.image_size=256", "model.attention_backend=math", "model.representation_size=256",
      "model.num_classes=5000"], 4),
]


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ac", "ac"])
@pytest.mark.parametrize("overrides,batch", SHAPES, ids=["sdpa", "dropout-gap", "math"])
def test_activation_memory_matches_torch_memory_tracker(overrides, batch, checkpointing):
    """Peak memory of a forward + backward in fp32 on CPU (torch.distributed._tools.MemTracker),
    less the weights and the gradients (allocated by a first step), within 15% of the plan's."""
    from torch.distributed._composable import checkpoint
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    from vitscale.model.vit import build_model

    config = load_config(None, overrides)
    torch.manual_seed(0)
    model = build_model(config.model)
    if checkpointing:
        for block in model.blocks:
            checkpoint(block)  # as vitscale/engine/parallelize.py applies it
    size, classes = config.model.image_size, config.model.num_classes

    def forward_backward():
        images = torch.randn(batch, 3, size, size)  # inside the tracker: the input batch counts
        targets = torch.randint(0, classes, (batch,))
        torch.nn.functional.cross_entropy(model(images).float(), targets).backward()

    forward_backward()
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        forward_backward()
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    measured = peak["Total"] - peak[_MemRefType.PARAM] - peak[_MemRefType.GRAD]
    predicted = activation_bytes(config.model, batch, 4, checkpointing, device="cpu")
    assert predicted == pytest.approx(measured, rel=0.15), (predicted / 2 ** 20, measured / 2 ** 20)


def test_plan_prints_a_table_and_consistent_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--config", "configs/vit_h14_jft.yaml", "--gpus", "64", "--gpu", "h100",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| deepspeed ZeRO-2 (configured) |" in text and "img/s per GPU" in text
    plan = json.loads(out.read_text())
    assert plan["parameters"] > 600e6 and plan["gradient_accumulation"] == 2
    rows = memory_rows(plan)
    states = [rows[f"deepspeed ZeRO-{s}"]["model_states"] for s in range(4)]
    assert states == sorted(states, reverse=True)
    # The largest micro-batch is the edge of what fits.
    config = load_config("configs/vit_h14_jft.yaml", [])
    usable = plan["usable_memory_gib"] * GIB
    row = rows["deepspeed ZeRO-2"]
    fixed = row["model_states"] + row["buffers_held"] + row["buffers_transient"]
    edge = row["largest_micro_batch"]
    assert fixed + activation_bytes(config.model, edge, 2, False) <= usable
    assert fixed + activation_bytes(config.model, edge + 1, 2, False) > usable
    assert row["activations_other"] < row["activations"] and row["largest_micro_batch_other"] > edge
    speed = plan["speed"]
    assert speed["step_seconds"] * speed["images_per_second"] == pytest.approx(4096)
    assert speed["images_per_second"] * 1003.9e9 == pytest.approx(0.4 * 989e12 * 64, rel=1e-3)
    assert plan["checkpoint"]["bytes"] == pytest.approx(14 * plan["parameters"])  # bf16 + fp32 master + moments


def test_plan_with_checkpointing_and_a_measured_decode_rate(tmp_path, capsys):
    bench = tmp_path / "bench_data.json"
    bench.write_text(json.dumps({"sizes": {"imagenet": {"vitscale_images_per_second": 500.0}}}))
    assert main(["plan", "--config", "configs/vit_b16_i21k.yaml", "--gpus", "8", "--data-bench", str(bench),
                 "engine.activation_checkpointing=true", "--json", str(tmp_path / "p.json")]) == 0
    plan = json.loads((tmp_path / "p.json").read_text())
    assert plan["data"]["cores_per_node"] == -(-int(plan["data"]["images_per_second_per_node"]) // 500)
    assert plan["speed"]["hardware_utilisation_needed"] == pytest.approx(0.4 * 4 / 3)
    assert "must run at 0.53 of peak" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--gpus", "3"], "engine.global_batch_size: 4096 is not divisible by micro-batch 128 x world size 3"),
    (["--gpus", "8", "--gpu", "tpu9"], "--gpu: unknown GPU 'tpu9'"),
    (["--gpus", "8", "--mfu", "1.5"], "--mfu: 1.5 is not in (0, 1]"),
    (["--gpus", "8", "--data-bench", "/nonexistent.json"], "--data-bench: /nonexistent.json is not"),
    (["--gpus", "8", "engine.kind=local"], "engine.kind: local runs one process, not 8"),
])
def test_bad_plan_arguments_are_one_line_errors(argv, message, capsys):
    assert main(["plan", "--config", "configs/vit_b16_i21k.yaml", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
