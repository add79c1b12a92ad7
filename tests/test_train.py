"""The main job end to end: ZeRO-1/2/3 on 2 CPU ranks against a single process and against a plain
PyTorch loop on the same global batches.

Tolerance for the loss curves (fp32 on CPU): rtol 1e-4. The runs differ only in the order of
floating-point sums: gradients are averaged over ranks by gloo (all-reduce / reduce-scatter)
instead of accumulated micro-batch by micro-batch in one process, and ZeRO-3 gathers parameters
in flat buffers. Each of those is exact to ~1e-7 relative (fp32 rounding); Adam divides by
sqrt(v), which can amplify such differences in the first steps for parameters whose gradients
are near zero, so over 8 steps we allow 1e-4 relative on the losses (measured: ~2e-7); a real
bug (a wrong accumulation factor, a missing rank, decay on the wrong tensors, a skipped clip)
changes losses by percent. bf16 (ZeRO-2) is compared at rel 1e-2 (measured 2e-3): its
activations and gradients are rounded to 8 mantissa bits (0.4% each), which the 8 steps compound.
"""

from __future__ import annotations

import pytest
import torch

from test_engine_support import REPO, engine_digits, free_port, read_log, run_job, step_losses, tiny_args  # noqa: F401
from vitscale.interop.export import export_checkpoint
from vitscale.model.weights import load_weights

STEPS = 8
MICRO, GLOBAL = 8, 16

DRIVER = '''
"""Runs vitscale/train.py's main job with a deterministic synthetic loader: step s draws the same
global batch of {GLOBAL} images whatever the world size; rank r takes its slices of it."""
import sys
sys.path.insert(0, {tests!r})
import vitscale.train as train
from test_train import SyntheticLoader

def loader(config, launch, comm=None):
    return SyntheticLoader(rank=launch.rank, world_size=launch.world_size, micro=config.engine.micro_batch_size,
                           global_batch=config.engine.global_batch_size)

parser = train.argparse.ArgumentParser()
train.add_arguments(parser)
sys.exit(train.main_job(train.prepare(parser.parse_intermixed_args()), build_loader=loader))
'''


def synthetic_global_batch(step: int, size: int = GLOBAL) -> tuple[torch.Tensor, torch.Tensor]:
    """Images with a learnable label: the class is the argmax of a fixed random projection."""
    images = torch.randn(size, 3, 16, 16, generator=torch.Generator().manual_seed(1000 + step))
    teacher = torch.randn(3 * 16 * 16, 10, generator=torch.Generator().manual_seed(7))
    return images, (images.flatten(1) @ teacher).argmax(dim=1)


class SyntheticLoader:
    def __init__(self, *, rank: int, world_size: int, micro: int, global_batch: int):
        self.rank, self.world_size, self.micro, self.global_batch = rank, world_size, micro, global_batch
        self.accumulation = global_batch // (micro * world_size)
        self.yielded = 0

    def __iter__(self):
        while True:
            step, index = divmod(self.yielded, self.accumulation)
            images, labels = synthetic_global_batch(step, self.global_batch)
            start = (index * self.world_size + self.rank) * self.micro
            self.yielded += 1
            rows = slice(start, start + self.micro)
            yield images[rows], labels[rows], torch.ones(self.micro, dtype=torch.bool)

    def state_dict(self):
        return {"yielded": self.yielded}

    def load_state_dict(self, state):
        self.yielded = state["yielded"]

    def skipped_samples(self):
        return {}


def plain_pytorch_losses(steps: int) -> list[float]:
    """The same training written directly in PyTorch: no DeepSpeed, one process."""
    from vitscale.config import load_config
    from vitscale.engine.optim import learning_rate, parameter_groups
    from vitscale.model import build_model

    config = load_config(REPO / "configs" / "demo.yaml", [*tiny_overrides(), f"run.steps={steps}"])
    torch.manual_seed(config.run.seed)
    model = build_model(config.model)
    optimizer = torch.optim.AdamW(parameter_groups(model, config.optim.weight_decay), lr=config.optim.lr,
                                  betas=(config.optim.beta1, config.optim.beta2), eps=config.optim.eps)
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        images, labels = synthetic_global_batch(step)
        optimizer.zero_grad()
        step_loss = 0.0
        for start in range(0, GLOBAL, MICRO):
            loss = torch.nn.functional.cross_entropy(model(images[start:start + MICRO]), labels[start:start + MICRO])
            (loss / (GLOBAL // MICRO)).backward()
            step_loss += loss.item() / (GLOBAL // MICRO)
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
        optimizer.step()
        losses.append(step_loss)
    return losses


def tiny_overrides() -> list[str]:
    from test_engine_support import TINY

    return list(TINY)


def run_synthetic(tmp_path, name, world_size, *extra):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(GLOBAL=GLOBAL, tests=str(REPO / "tests")))
    run_dir = tmp_path / name
    args = tiny_args(run_dir, ("unused", "unused"), f"run.steps={STEPS}", *extra)
    args = [a for a in args if not a.startswith("data.train_shards")]
    args.append(f"data.train_shards={REPO / 'configs' / 'demo.yaml'}")  # any existing file passes the check
    run_job(args, tmp_path / f"logs_{name}", world_size=world_size, script=driver)
    losses = step_losses(run_dir)
    return [losses[s] for s in range(1, STEPS + 1)]


def test_zero_stages_match_single_process_pytorch(tmp_path):
    """ZeRO-1/2/3 on 2 ranks (micro-batch 8, no accumulation) and DeepSpeed in one process
    (2 micro-batches of 8 accumulated) against plain PyTorch, on the same global batches of 16."""
    reference = plain_pytorch_losses(STEPS)
    assert reference[-1] < reference[0]  # it trains: the comparison is not between flat curves
    single = run_synthetic(tmp_path, "single", 1, "engine.zero_stage=0")  # DeepSpeed, 1 process, accumulation 2
    assert single == pytest.approx(reference, rel=1e-4)
    # bf16 (DeepSpeed's bf16 path, fp32 master weights): activations and gradients carry 8 bits
    # of mantissa (relative rounding 2^-8 = 0.4%), so the curve agrees to percent, not 1e-4.
    bf16 = run_synthetic(tmp_path, "zero2_bf16", 2, "--ds_config", str(REPO / "configs" / "zero2.json"),
                         "engine.precision=bf16")
    assert bf16 == pytest.approx(reference, rel=1e-2)  # measured: 2e-3
    exported = {}
    for stage in (1, 2, 3):
        # ZeRO-2 also recomputes activations per block: the same math, so the same curve.
        extra = ["engine.activation_checkpointing=true"] if stage == 2 else []
        curve = run_synthetic(tmp_path, f"zero{stage}", 2, "--ds_config", str(REPO / "configs" / f"zero{stage}.json"),
                              *extra)
        assert curve == pytest.approx(reference, rel=1e-4), f"ZeRO-{stage}"
        # `vitscale export` merges each stage's partitions into the same fp32 weights.
        path = export_checkpoint(tmp_path / f"zero{stage}", tmp_path / f"zero{stage}.safetensors")
        exported[stage], config = load_weights(path)
        assert config.engine.zero_stage == stage
    for name, tensor in exported[1].items():
        for stage in (2, 3):
            assert torch.allclose(comparable(name, exported[stage][name]), comparable(name, tensor),
                                  rtol=1e-4, atol=1e-5), (stage, name)


def comparable(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The key bias has an exactly zero true gradient (softmax ignores a shift shared by all keys
    of a query), so what it receives is rounding noise, which Adam normalises into lr-sized steps
    in arbitrary directions: it is the one tensor that legitimately differs between stages."""
    if name.endswith("attn.qkv.bias"):
        q, _, v = tensor.chunk(3)
        return torch.cat([q, v])
    return tensor


@pytest.mark.parametrize("launcher", ["vitscale train (one process)", "deepspeed launcher (2 processes)"])
def test_entry_points(tmp_path, engine_digits, launcher):
    import os
    import subprocess
    import sys

    from vitscale.engine import checkpoint as ckpt

    run_dir = tmp_path / "run"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    args = tiny_args(run_dir, engine_digits, "run.steps=2")
    if launcher.startswith("vitscale"):
        command = [sys.executable, "-m", "vitscale", "train", *args]
    else:
        deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
        command = [deepspeed, "--num_gpus", "2", "--master_port", str(free_port()), str(REPO / "vitscale" / "train.py"),
                   "--ds_config", str(REPO / "configs" / "zero2.json"), *args]
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "done: finished at step 2" in result.stdout
    trainer = ckpt.checkpoint_dir(run_dir, 2) / "trainer.json"
    assert ckpt.is_complete(trainer.parent)
    assert '"world_size": ' + ("1" if launcher.startswith("vitscale") else "2") in trainer.read_text()


def test_the_deepspeed_launcher_relays_a_ranks_exit_code(tmp_path, engine_digits):
    """Bad data found after the process group started: every rank exits 2 with its rank in one
    line, and `deepspeed` hands 2 to the shell (plain torchrun would say 1)."""
    import os
    import subprocess
    import sys

    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "x-000000.tar").write_text("not a tar archive\n" * 40)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    args = tiny_args(tmp_path / "run", (str(shards), ""), "run.steps=2")
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    result = subprocess.run([deepspeed, "--num_gpus", "2", "--master_port", str(free_port()),
                             str(REPO / "vitscale" / "train.py"), *args], env=env, cwd=REPO, capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "rank 0: error: data.train_shards: the shards hold no samples" in output, output[-3000:]


def test_demo_command_runs_the_main_job_under_torchrun(tmp_path):
    """`vitscale demo` end to end (shards -> launch/local_cpu.sh -> torchrun, 2 ranks, ZeRO-2 ->
    evaluation), shortened to 40 steps; the full 300 steps reach ~97% held-out accuracy."""
    import os
    import re
    import subprocess
    import sys

    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    result = subprocess.run([sys.executable, "-m", "vitscale", "demo", "--steps", "40", "--output-dir", str(tmp_path),
                             "engine.eval_every=20"], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    progress = r"step 25/40 \| loss [\d.]+ \| lr [\d.e+-]+ \| [\d,]+ images/s \| ETA \d+:\d\d:\d\d"
    assert re.search(progress, result.stdout)
    accuracy = float(re.search(r"held-out accuracy ([\d.]+)%", result.stdout).group(1))
    assert accuracy > 25, result.stdout[-2000:]  # chance is 10%


def test_periodic_fewshot_evaluation_runs_in_the_training_loop(tmp_path, engine_digits):
    """fewshot.every=N: the frozen representation is scored by the paper's few-shot regression
    every N steps and the results land in log.jsonl next to the step records."""
    import os
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    args = tiny_args(run_dir, engine_digits, "run.steps=4", "fewshot.every=2",
                     f"fewshot.train_shards={engine_digits[0]}", f"fewshot.test_shards={engine_digits[1]}",
                     "fewshot.shots=[1,5]", "fewshot.max_test_images=200")
    result = subprocess.run([sys.executable, "-m", "vitscale", "train", *args], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    evals = [r for r in read_log(run_dir) if "eval" in r and "fewshot_1shot" in r["eval"]]
    assert [r["step"] for r in evals] == [2, 4]
    for record in evals:
        assert set(record["eval"]) == {"fewshot_1shot", "fewshot_5shot"}
        # 10 classes: chance is 0.1; even a barely trained ViT's features are far above it on digits.
        assert 0.2 < record["eval"]["fewshot_5shot"] <= 1.0, record
