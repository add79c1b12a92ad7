"""Few-shot linear evaluation (and top-1) on the demo data: the solver against scikit-learn and
brute force, a briefly trained model far above chance and far above a random one, a
label-shuffled control at chance, and the same numbers through shards and `vitscale eval`."""

from __future__ import annotations

import json

import pytest
import torch

from vitscale.cli import main as vitscale_main
from vitscale.config import Config
from vitscale.data import DataConfig
from vitscale.data.datasets import digits_arrays, digits_split, write_digits_shards
from vitscale.errors import DataError
from vitscale.evaluation import FewShotEvaluator, evaluate_top1, fewshot_accuracy
from vitscale.evaluation.config import FewShotConfig
from vitscale.evaluation.fewshot import choose_l2_reg, ridge_solve, select_shots, with_bias
from vitscale.model import ModelConfig, build_model
from vitscale.model.weights import save_weights

IMAGE_SIZE = 16
CHANCE = 0.1  # ten digit classes


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def digits():
    images, labels = digits_arrays(IMAGE_SIZE)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # the loader's [-1, 1]
    y = torch.from_numpy(labels)
    train, held_out = digits_split(labels)
    return (x[train], y[train]), (x[held_out], y[held_out])


def tiny_model_config() -> ModelConfig:
    return ModelConfig(name="Ti/4", image_size=IMAGE_SIZE, depth=1, width=32, mlp_dim=64, heads=4, num_classes=10,
                       classifier="gap", attention_backend="sdpa")


@pytest.fixture(scope="module")
def models(digits):
    """(random, trained): the same initialisation, before and after 200 Adam steps."""
    (x, y), _ = digits
    torch.manual_seed(0)
    random_model = build_model(tiny_model_config()).eval()
    trained = build_model(tiny_model_config())
    trained.load_state_dict(random_model.state_dict())
    optimizer = torch.optim.Adam(trained.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        batch = torch.randint(len(x), (64,), generator=generator)
        loss = torch.nn.functional.cross_entropy(trained(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return random_model, trained.eval()


# ---------------------------------------------------------------------------------------------
# The solver.


def test_ridge_matches_scikit_learn_and_loo_matches_refits():
    from sklearn.linear_model import Ridge

    generator = torch.Generator().manual_seed(0)
    for n, d in ((30, 8), (12, 40)):  # primal and dual forms
        x = torch.randn(n, d, generator=generator, dtype=torch.float64)
        y = torch.randn(n, 3, generator=generator, dtype=torch.float64)
        reference = Ridge(alpha=0.7, fit_intercept=False, solver="cholesky").fit(x.numpy(), y.numpy()).coef_.T
        assert torch.allclose(ridge_solve(x, y, 0.7), torch.from_numpy(reference), atol=1e-9)
    # Leave-one-out selection: brute-force refits agree with the closed form.
    x = with_bias(torch.randn(25, 6, generator=generator, dtype=torch.float64))
    labels = torch.arange(25) % 5
    y = 2.0 * torch.nn.functional.one_hot(labels, 5).double() - 1
    grid = (0.01, 1.0, 100.0, 1e4)

    def brute_force(l2):
        hits = 0
        for i in range(25):
            rest = torch.arange(25) != i
            hits += int((x[i] @ ridge_solve(x[rest], y[rest], l2)).argmax() == labels[i])
        return hits / 25

    accuracies = {l2: brute_force(l2) for l2 in grid}
    best = max(accuracies.values())
    assert choose_l2_reg(x, y, grid) == max(l2 for l2, a in accuracies.items() if a == best)


def test_shot_selection_takes_the_first_k_per_class_and_refuses_too_few():
    labels = torch.tensor([3, 1, 3, 1, 3, 2, 2])
    features = torch.arange(7.0)[:, None]
    chosen, chosen_labels = select_shots(features, labels, 2)
    assert chosen.flatten().tolist() == [0, 1, 2, 3, 5, 6]
    assert chosen_labels.tolist() == [3, 1, 3, 1, 2, 2]
    with pytest.raises(DataError, match="class 1 has 2 training images, 3-shot needs 3"):
        select_shots(features, labels, 3)
    with pytest.raises(DataError, match="one integer class per image"):
        select_shots(features, torch.zeros(7, 4), 1)


# ---------------------------------------------------------------------------------------------
# Models on the demo data.


def test_trained_model_far_above_chance_and_random_model(digits, models):
    train, held_out = digits
    random_model, trained = models
    shots = (1, 5, 10, 25)
    trained_accuracy = fewshot_accuracy(trained, train, held_out, shots=shots)
    random_accuracy = fewshot_accuracy(random_model, train, held_out, shots=shots)
    print("\ntrained", trained_accuracy, "\nrandom", random_accuracy)
    assert trained_accuracy["fewshot_5shot"] >= 0.7 and trained_accuracy["fewshot_25shot"] >= 0.8
    # A random ViT is a random feature map: it keeps some pixel geometry, so it is above chance on
    # digits, but far below the trained model at every k.
    assert random_accuracy["fewshot_1shot"] <= 0.35 and random_accuracy["fewshot_5shot"] <= 0.6
    for k in shots:
        assert trained_accuracy[f"fewshot_{k}shot"] - random_accuracy[f"fewshot_{k}shot"] >= 0.25, k


def test_shuffled_labels_give_chance(digits, models):
    """Control: with the few-shot labels permuted, no information links features to classes,
    so the evaluation of even the trained model must fall to chance."""
    (x, y), held_out = digits
    _, trained = models
    accuracies = []
    for seed in range(3):
        permuted = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))]
        accuracies.append(fewshot_accuracy(trained, (x, permuted), held_out, shots=(5,))["fewshot_5shot"])
    assert abs(sum(accuracies) / len(accuracies) - CHANCE) <= 0.1


def test_representations_are_frozen_and_mode_restored(digits, models):
    train, held_out = digits
    _, trained = models
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    trained.train()
    fewshot_accuracy(trained, train, held_out, shots=(1,))
    assert trained.training
    trained.eval()
    assert all(torch.equal(before[k], v) for k, v in trained.state_dict().items())


# ---------------------------------------------------------------------------------------------
# Through shards, the eval loader and the command line.


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_digits_shards(tmp_path_factory.mktemp("digits"), image_size=IMAGE_SIZE, samples_per_shard=400)


def test_shards_and_cli_agree_with_arrays(tmp_path, digits, models, shards):
    train_pattern, eval_pattern = shards
    train, held_out = digits
    _, trained = models
    data = DataConfig(num_workers=0, pin_memory=False)
    evaluator = FewShotEvaluator(data, train_shards=train_pattern, test_shards=eval_pattern, image_size=IMAGE_SIZE,
                                 num_classes=10, shots=(1, 5), micro_batch_size=50)
    from_shards = evaluator.evaluate(trained)
    from_arrays = fewshot_accuracy(trained, train, held_out, shots=(1, 5))
    for key, value in from_arrays.items():
        assert abs(from_shards[key] - value) <= 0.02, (key, from_shards, from_arrays)

    config = Config(model=tiny_model_config(), data=data).validate()
    assert FewShotEvaluator.from_config(config) is None  # off by default
    config.fewshot = FewShotConfig(every=100, train_shards=train_pattern, test_shards=eval_pattern, shots=[1, 5],
                                   micro_batch_size=50)
    assert FewShotEvaluator.from_config(config.validate()).evaluate(trained) == pytest.approx(from_shards)
    weights = save_weights(tmp_path / "digits.safetensors", trained.state_dict(), config)
    out = tmp_path / "fewshot.json"
    assert vitscale_main(["eval", "fewshot", str(weights), "--train-shards", train_pattern, "--test-shards",
                          eval_pattern, "--shots", "1", "5", "--device", "cpu", "--output", str(out)]) == 0
    assert json.loads(out.read_text()) == pytest.approx(from_shards)

    # Top-1 through the eval loader equals the plain computation on the arrays.
    x, y = held_out
    with torch.no_grad():
        expected = (trained(x).argmax(1) == y).double().mean().item()
    assert vitscale_main(["eval", "top1", str(weights), "--shards", eval_pattern, "--batch-size", "64",
                          "--device", "cpu", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["samples"] == len(y) and abs(result["top1"] - expected) <= 0.01
    # Public-format weights are converted on the fly: the same model as a big_vision .npz.
    from vitscale.interop import vitscale_to_npz, write_npz

    npz = write_npz(tmp_path / "digits.npz", vitscale_to_npz(trained.state_dict(), config.model, "big_vision"))
    assert vitscale_main(["eval", "top1", str(npz), "--shards", eval_pattern, "--device", "cpu", "--output",
                          str(out), "model.mlp_activation=gelu", "data.num_workers=0", "data.pin_memory=false"]) == 0
    assert json.loads(out.read_text()) == result


def test_top1_of_a_training_checkpoint_picks_the_latest_complete(tmp_path, models, digits, shards):
    """A run directory: the newest checkpoint with a COMPLETE marker is evaluated, not a newer
    one that was interrupted mid-write."""
    from vitscale.config import save_config
    from vitscale.engine.checkpoint import checkpoint_dir, mark_complete

    random_model, trained = models
    _, (x, y) = digits
    config = Config(model=tiny_model_config(), data=DataConfig(num_workers=0, pin_memory=False)).validate()
    for step, model, complete in ((100, trained, True), (200, random_model, False)):
        directory = checkpoint_dir(tmp_path / "run", step)
        directory.mkdir(parents=True)
        torch.save({"module": model.state_dict()}, directory / "mp_rank_00_model_states.pt")
        save_config(config, directory / "config.yaml")
        if complete:
            mark_complete(directory, {"step": step})
    with torch.no_grad():
        expected = (trained(x).argmax(1) == y).double().mean().item()
    out = tmp_path / "top1.json"
    assert vitscale_main(["eval", "top1", str(tmp_path / "run"), "--shards", shards[1], "--device", "cpu",
                          "--output", str(out)]) == 0
    assert abs(json.loads(out.read_text())["top1"] - expected) <= 0.01


RANK_SCRIPT = """
import json, sys, torch, torch.distributed as dist
from vitscale.data import build_eval_loader
from vitscale.evaluation.cli import load_for_eval
from vitscale.engine.distributed import Communicator
from vitscale.evaluation.top1 import evaluate_top1
rank, world_size, port, weights, shards, out = sys.argv[1:]
rank, world_size = int(rank), int(world_size)
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
model, config = load_for_eval(weights, ["data.num_workers=0", "data.pin_memory=false",
                                       f"data.eval_shards={shards}"], "cpu")
loader = build_eval_loader(config.data, micro_batch_size=32, image_size=config.model.image_size,
                           num_classes=config.model.num_classes, rank=rank, world_size=world_size)
result = evaluate_top1(model, loader, reduce=Communicator(torch.device("cpu"), world_size, True).host_reduce)
result["local_batches"] = len(loader)
json.dump(result, open(f"{out}/rank{rank}.json", "w"))
dist.destroy_process_group()
"""


def test_top1_sums_over_ranks(tmp_path, models, digits, shards):
    """Two gloo processes, each scoring its share of the held-out shards (padded to equal batch
    counts), both report the accuracy over all images exactly once."""
    import socket
    import subprocess
    import sys

    _, trained = models
    _, (x, y) = digits
    with torch.no_grad():
        expected = (trained(x).argmax(1) == y).double().mean().item()
    config = Config(model=tiny_model_config()).validate()
    weights = save_weights(tmp_path / "digits.safetensors", trained.state_dict(), config)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    ranks = [subprocess.Popen([sys.executable, str(script), str(rank), "2", str(port), str(weights), shards[1],
                               str(tmp_path)]) for rank in range(2)]
    assert [process.wait(timeout=300) for process in ranks] == [0, 0]
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert results[0]["local_batches"] == results[1]["local_batches"]
    for result in results:
        assert result["samples"] == len(y)
        assert abs(result["top1"] - expected) <= 0.01


def test_top1_ignores_padding_and_scores_multi_hot(models, digits):
    _, trained = models
    _, (x, y) = digits
    x, y = x[:40], y[:40]
    with torch.no_grad():
        predicted = trained(x).argmax(1)
    valid = torch.arange(40) < 30
    result = evaluate_top1(trained, [(x, y, valid)])
    assert result["samples"] == 30
    assert result["top1"] == pytest.approx((predicted[:30] == y[:30]).double().mean().item())
    multi_hot = torch.zeros(40, 10)
    multi_hot[torch.arange(40), y] = 1
    multi_hot[torch.arange(40), (y + 1) % 10] = 1  # a second label per image
    hits = (predicted == y) | (predicted == (y + 1) % 10)
    assert evaluate_top1(trained, [(x, multi_hot)])["prec@1"] == pytest.approx(hits.double().mean().item())


def test_fewshot_config_is_validated():
    from vitscale.config import load_config
    from vitscale.errors import ConfigError

    with pytest.raises(ConfigError, match="fewshot.train_shards: few-shot evaluation is on"):
        load_config(None, ["fewshot.every=100"])
    with pytest.raises(ConfigError, match="fewshot.shots"):
        load_config(None, ["fewshot.shots=[0, 5]"])
    assert load_config(None, ["fewshot.shots=[5]"]).fewshot.shots == [5]


def test_eval_cli_errors_are_one_line(tmp_path, capsys):
    assert vitscale_main(["eval", "top1", str(tmp_path / "missing.safetensors")]) == 2
    assert "not found" in capsys.readouterr().err


def big_vision_reference(x_train, y_train, x_test, y_test, *, shots, num_classes, seed, l2_reg=2.0 ** 10):
    """big_vision's evaluators/fewshot_lsr.py in numpy: the seed's per-class permutations, whitening,
    a bias column of 100, {-1, 1} one-hot targets, ridge through the eigendecomposition."""
    import numpy as np

    rng = np.random.default_rng(seed)
    chosen = np.concatenate([rng.permutation(np.where(y_train == c)[0])[:shots] for c in range(num_classes)])
    x, y = x_train[chosen], y_train[chosen]
    mean, std = x.mean(0, keepdims=True), x.std(0, keepdims=True) + 1e-5
    x = np.pad((x - mean) / std, ((0, 0), (0, 1)), constant_values=100.0)
    targets = 2.0 * np.eye(num_classes)[y] - 1.0
    if x.shape[0] >= x.shape[1]:
        eigs, q = np.linalg.eigh(x.T @ x)
        weights = (q / (eigs + l2_reg)) @ (q.T @ (x.T @ targets))
    else:
        eigs, q = np.linalg.eigh(x @ x.T)
        weights = ((x.T @ q) / (eigs + l2_reg)) @ (q.T @ targets)
    test = np.pad((x_test - mean) / std, ((0, 0), (0, 1)), constant_values=100.0)
    return float(np.mean((test @ weights).argmax(1) == y_test))


class FlatFeatures(torch.nn.Module):
    """A 'model' whose representation is its input, flattened: fewshot_accuracy on given features."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def forward_representation(self, x):
        return x.flatten(1)


@pytest.mark.parametrize("shots", [1, 5, 25])
def test_big_vision_protocol_equals_an_independent_ridge_with_l2_1024(shots):
    import numpy as np

    rng = np.random.default_rng(7)
    classes, dim = 10, 16
    centres = rng.normal(size=(classes, dim))
    y_train, y_test = np.repeat(np.arange(classes), 40), np.repeat(np.arange(classes), 30)
    rng.shuffle(y_train)
    x_train = centres[y_train] + 1.5 * rng.normal(size=(len(y_train), dim))
    x_test = centres[y_test] + 1.5 * rng.normal(size=(len(y_test), dim))
    expected = [big_vision_reference(x_train, y_train, x_test, y_test, shots=shots, num_classes=classes, seed=s)
                for s in range(3)]
    assert len(set(expected)) > 1 or shots == 25  # the seeds draw different sets
    images = lambda x: torch.from_numpy(x).reshape(len(x), 1, 4, 4)  # noqa: E731
    got = fewshot_accuracy(FlatFeatures(), (images(x_train), torch.from_numpy(y_train)),
                           (images(x_test), torch.from_numpy(y_test)), shots=(shots,), num_classes=classes)
    assert got[f"fewshot_{shots}shot"] == pytest.approx(float(np.mean(expected)), abs=1e-12)
    loo = fewshot_accuracy(FlatFeatures(), (images(x_train), torch.from_numpy(y_train)),
                           (images(x_test), torch.from_numpy(y_test)), shots=(shots,), protocol="loo")
    assert set(loo) == set(got)
