"""The config tree: files + dotted overrides -> typed, validated values; mistakes are one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vitscale.config import config_from_dict, load_config, save_config, read_yaml_tree
from vitscale.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent

CONFIGS = sorted(Path(__file__).resolve().parents[1].glob("configs/**/*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    load_config(path)


def test_every_shipped_config_opens_with_a_comment():
    for path in CONFIGS:
        assert path.read_text().startswith("#"), f"{path.name} must open with the command that runs it"


def test_overrides_are_typed_and_win_over_the_file(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("model:\n  name: L/16\noptim:\n  lr: 1.0e-3\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\nmodel:\n  image_size: 384\n")
    config = load_config(child, ["optim.lr=3e-4", "model.drop_path=0.1", "data.multi_label=true",
                                 "--engine.micro_batch_size=16"])
    assert config.model.name == "L/16" and config.model.image_size == 384  # inherited + own
    assert config.optim.lr == 3e-4 and isinstance(config.optim.lr, float)  # "3e-4" is a str to YAML
    assert config.model.drop_path == 0.1 and config.data.multi_label is True
    assert config.engine.micro_batch_size == 16


def test_saved_config_reloads_identically(tmp_path):
    config = load_config(None, ["model.name=H/14", "optim.lr=3e-4", "model.representation_size=1280"])
    path = save_config(config, tmp_path / "run" / "config.yaml")
    assert load_config(path) == config


@pytest.mark.parametrize("overrides,key,words", [
    (["model.nme=B/16"], "model.nme", "did you mean model.name"),
    (["optim.lr=fast"], "optim.lr", "expected a number"),
    (["engine.micro_batch_size=2.5"], "engine.micro_batch_size", "expected an integer"),
    (["model.classifier=cls"], "model.classifier", "not one of"),
    (["model.image_size=225"], "model.image_size", "not divisible by the patch size 16"),
    (["model.name=X/16"], "model.name", "unknown model"),
    (["model.heads=7"], "model.heads", "does not split"),
    (["optim.lr=-1"], "optim.lr", "must be > 0"),
    (["model.dropout=1.5"], "model.dropout", "must be in"),
    (["lr"], "lr", "key=value"),
])
def test_mistakes_name_the_key_and_the_fix(overrides, key, words):
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert error.value.key == key and words in str(error.value)
    assert error.value.fix, "every config error says how to fix it"


def test_section_given_a_value_is_an_error():
    with pytest.raises(ConfigError, match="expected a section"):
        config_from_dict({"model": 3})


def test_base_cycle_and_bad_yaml_are_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        read_yaml_tree(tmp_path / "a.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


@pytest.mark.parametrize("args", [
    ["config", "check", "model.image_size=225"],
    ["config", "check", "model.nmae=B/16"],
    ["config", "check", "optim.lr=abc"],
    ["config", "check", "--config", "/nonexistent.yaml"],
])
def test_cli_prints_one_line_not_a_traceback(args):
    result = subprocess.run([sys.executable, "-m", "vitscale", *args], capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vitscale config: error: config"), result.stderr


def test_a_key_given_twice_is_one_line_naming_both_values_and_the_quoting_fix():
    from vitscale.errors import ConfigError

    expanded = [f"data.train_shards=/data/train-{index:06d}.tar" for index in range(4)]  # what bash makes of {..}
    with pytest.raises(ConfigError) as error:
        load_config(None, expanded)
    message = str(error.value)
    assert "data.train_shards: is given 4 times" in message and "'/data/train-000000.tar'" in message
    assert "the shell expanded a brace pattern" in message and "quote it" in message and "\n" not in message
    with pytest.raises(ConfigError, match=r"optim.lr: is given 2 times .*'1e-3', then '3e-4'"):
        load_config(None, ["optim.lr=1e-3", "model.name=B/16", "optim.lr=3e-4"])


def test_no_usage_line_in_the_repository_leaves_a_shard_pattern_to_the_shell():
    """An unquoted data.train_shards=.../train-{000000..004095}.tar in a command line becomes
    4,096 overrides of one key. Every usage line (scripts, configs, docs) quotes its patterns."""
    import re

    from test_engine_support import REPO

    unquoted = re.compile(r"(?<!['\"])\b[a-z_]+\.[a-z_]+=[^\s'\"]*\{\d+\.\.\d+\}")
    offenders = []
    for path in [*REPO.glob("*.md"), REPO / "Makefile", *(REPO / "launch").rglob("*"), *(REPO / "configs").rglob("*"),
                 *(REPO / "vitscale").rglob("*.py"), *(REPO / "scripts").rglob("*"), *(REPO / "docker").rglob("*")]:
        if path.is_file():
            for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if unquoted.search(line):
                    offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize("override, key", [("optim.lr=nan", "optim.lr"), ("optim.lr=inf", "optim.lr"),
                                           ("optim.weight_decay=inf", "optim.weight_decay"),
                                           ("optim.weight_decay=nan", "optim.weight_decay"),
                                           ("optim.beta2=nan", "optim.beta2"),
                                           ("optim.grad_clip=nan", "optim.grad_clip"),
                                           ("optim.lr=-1e-3", "optim.lr"), ("optim.eps=0", "optim.eps")])
def test_non_finite_and_non_positive_optimizer_values_are_refused(override, key):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert error.value.key == key and "\n" not in str(error.value)


def test_resume_from_a_file_says_it_is_a_file(tmp_path):
    from vitscale.engine.checkpoint import resolve_checkpoint
    from vitscale.errors import CheckpointError

    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(b"not a checkpoint directory")
    with pytest.raises(CheckpointError, match="is a file, not a checkpoint"):
        resolve_checkpoint(weights)
    with pytest.raises(CheckpointError, match="not found"):
        resolve_checkpoint(tmp_path / "missing")


def cli_without_heavy_imports(argv: list[str]) -> str:
    """What `vitscale ARGV` prints, asserting it imported none of the heavy packages."""
    code = ("import sys\nfrom vitscale.cli import main\n"
            f"main({argv!r})\n"
            "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'torchvision', 'webdataset',"
            " 'prometheus_client', 'deepspeed', 'numpy', 'PIL'})\n"
            "print('HEAVY', heavy)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout, done.stdout[-300:]
    return done.stdout.split("HEAVY")[0]


def test_config_show_imports_no_torch_and_prints_the_shape_a_name_implies():
    """`vitscale config show` is a newcomer's first command: it must not wait for torch,
    torchvision, webdataset or prometheus_client to import, and must show H/14's real shape."""
    printed = cli_without_heavy_imports(["config", "show", "--config", "configs/vit_h14_jft.yaml"])
    model = yaml.safe_load(printed)["model"]
    assert (model["depth"], model["width"], model["mlp_dim"], model["heads"], model["patch_size"]) == \
        (32, 1280, 5120, 16, 14)


def _leaf_keys(cls, prefix=""):
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[item.name]):
            yield from _leaf_keys(hints[item.name], f"{prefix}{item.name}.")
        else:
            yield f"{prefix}{item.name}"


def test_config_explain_documents_every_field_from_its_source_comment_and_imports_no_torch():
    """`vitscale config explain` prints each field's type, default, configured value and the
    comment written above it in the dataclass; every key of the tree has one."""
    from vitscale.config import Config

    printed = cli_without_heavy_imports(["config", "explain", "--config", "configs/vit_h14_jft.yaml",
                                         "engine.checkpoint_async", "model.name", "engine.keep_last=7",
                                         "engine.keep_last"])
    text = " ".join(printed.split())  # undo the wrapping
    assert "engine.checkpoint_async: bool | None (default null)" in text
    assert "the step waits only while the state is copied to host memory" in text  # the source comment
    assert "model.name: str (default B/16, configured H/14)" in text  # from the file
    assert "engine.keep_last: int (default 3, configured 7)" in text  # from the override
    assert "keep the newest k complete checkpoints" in text  # a comment block shared by a group of fields

    whole = subprocess.run([sys.executable, "-m", "vitscale", "config", "explain"], capture_output=True,
                           text=True, cwd=REPO, timeout=60)
    assert whole.returncode == 0, whole.stderr
    documented = {line.split(":")[0] for line in whole.stdout.splitlines() if line and not line.startswith(" ")}
    assert documented == set(_leaf_keys(Config))
    assert "(no documentation)" not in whole.stdout

    section = subprocess.run([sys.executable, "-m", "vitscale", "config", "explain", "fewshot"],
                             capture_output=True, text=True, cwd=REPO, timeout=60)
    assert {line.split(":")[0] for line in section.stdout.splitlines() if line and not line.startswith(" ")} == \
        {key for key in _leaf_keys(Config) if key.startswith("fewshot.")}

    typo = subprocess.run([sys.executable, "-m", "vitscale", "config", "explain", "engine.keeplast"],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert typo.returncode == 2 and "did you mean engine.keep_last?" in typo.stderr
    assert "Traceback" not in typo.stderr
