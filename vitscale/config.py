"""One typed config tree, from YAML file(s) plus dotted command-line overrides.

    vitscale config show --config configs/vit_b16_i21k.yaml optim.lr=3e-4 model.drop_path=0.1

Each component owns its section dataclass (`ModelConfig` in vitscale/model, `DataConfig` in
vitscale/data, ...); this module composes them, coerces every value to the field's declared type,
and turns every mistake into a `ConfigError` naming the dotted key and the fix. A YAML file may
start from another with `base: other.yaml` (relative to the file), so a tiny variant only lists
what it changes. The resolved tree is saved with every run and checkpoint (`save_config`).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from vitscale.data.config import DataConfig
from vitscale.engine.config import EngineConfig, OptimConfig, ScheduleConfig
from vitscale.errors import ConfigError
from vitscale.evaluation.config import FewShotConfig
from vitscale.checks import require_positive
from vitscale.metrics.config import MetricsConfig
from vitscale.model.config import ModelConfig
from vitscale.research.config import FinetuneConfig, MaskedPatchConfig, check_research_rules


@dataclass
class RunConfig:
    name: str = "vitscale"
    # Everything a run writes (config.yaml, logs, checkpoints) goes below output_dir/name.
    output_dir: str = "runs"
    seed: int = 0
    # Optimizer steps to train for; the schedule's horizon unless schedule.total_steps is set.
    steps: int = 1000
    log_every: int = 10
    # Learning objective: supervised classification or masked patch prediction.
    objective: Literal["classification", "masked_patch"] = "classification"

    def validate(self) -> None:
        require_positive(self, "run", ("steps", "log_every"))

    @property
    def directory(self) -> Path:
        return Path(self.output_dir) / self.name


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    run: RunConfig = field(default_factory=RunConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    masked_patch: MaskedPatchConfig = field(default_factory=MaskedPatchConfig)
    fewshot: FewShotConfig = field(default_factory=FewShotConfig)

    def validate(self) -> "Config":
        """Check every section, then the rules that span sections. Returns self."""
        for section in dataclasses.fields(self):
            getattr(self, section.name).validate()
        self.model.shape()  # image/patch/heads divisibility, named after the offending key
        check_research_rules(self)  # SAM/GSAM vs ZeRO stage and precision, fine-tuning vs objective
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Loading, overriding, saving.


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Build and validate the tree: defaults <- YAML file (and its bases) <- `key=value` overrides."""
    raw: dict[str, Any] = read_yaml_tree(Path(path)) if path else {}
    check_repeated_keys(overrides)
    for item in overrides:
        apply_override(raw, item)
    return config_from_dict(raw).validate()


def check_repeated_keys(overrides: typing.Sequence[str]) -> None:
    """A key given twice is an error, not "the last one wins": the usual cause is an unquoted
    shard pattern that the shell expanded into one override per shard."""
    seen: dict[str, str] = {}
    for item in overrides:
        key, _, value = (item[2:] if item.startswith("--") else item).partition("=")
        if key not in seen:
            seen[key] = value
            continue
        count = sum(1 for other in overrides if other.lstrip("-").partition("=")[0] == key)
        expanded = value != seen[key] and re.sub(r"\d+", "#", value) == re.sub(r"\d+", "#", seen[key]) \
            and re.search(r"[A-Za-z/]", value)
        hint = (f"the shell expanded a brace pattern into {count} values: quote it, e.g. "
                f"'{key}=/data/train-{{000000..000099}}.tar'") if expanded else \
            "give it once; quote values that contain spaces, braces or wildcards"
        raise ConfigError(key, f"is given {count} times on the command line ({seen[key]!r}, then {value!r})", hint)


def config_from_dict(raw: dict[str, Any]) -> Config:
    return _build(Config, raw, prefix="")


def read_yaml_tree(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if not path.is_file():
        raise ConfigError("", f"file {path} not found", "pass an existing YAML file to --config")
    if path in _seen:
        raise ConfigError("base", f"{path} includes itself through `base:`", "remove the cycle")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError("", f"{path}{where} is not valid YAML", "fix the syntax") from None
    if not isinstance(data, dict):
        raise ConfigError("", f"{path} must hold a mapping of sections", "see configs/ for examples")
    base = data.pop("base", None)
    if base is None:
        return data
    merged = read_yaml_tree(path.parent / base, _seen + (path,))
    _deep_merge(merged, data)
    return merged


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one `section.key=value` override to the raw (unvalidated) tree."""
    item = item[2:] if item.startswith("--") else item
    if "=" not in item:
        raise ConfigError(item, "override is not of the form key=value", "write e.g. optim.lr=3e-4")
    key, text = item.split("=", 1)
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(key, "empty component in the dotted key", "write e.g. optim.lr=3e-4")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(key, f"{part} is a value, not a section", "override a leaf key")
        node = child
    # YAML gives lists, null and booleans; the field type decides the rest during coercion.
    try:
        node[parts[-1]] = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        node[parts[-1]] = text


def save_config(config: Config, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    tmp.replace(path)
    return path


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Type coercion: every value becomes exactly the declared type, or a ConfigError.


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(prefix, f"expected a section (mapping), got {raw!r}", "indent its keys below it")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [key for key in raw if key not in names]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), names, n=1)
        fix = f"did you mean {_join(prefix, close[0])}?" if close else f"known keys: {', '.join(names)}"
        raise ConfigError(_join(prefix, key), "unknown key", fix)
    kwargs = {name: _coerce(raw[name], hints[name], _join(prefix, name)) for name in names if name in raw}
    return cls(**kwargs)


def _coerce(value: Any, kind: Any, key: str) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if dataclasses.is_dataclass(kind):
        return _build(kind, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(value, option, key)
            except ConfigError as error:
                errors.append(error.problem)
        raise ConfigError(key, errors[-1], "see the field's type in `vitscale config show`")
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f"did you mean {close[0]}?" if close else "choose one of " + ", ".join(map(str, args))
            raise ConfigError(key, f"{value!r} is not one of {', '.join(map(str, args))}", hint)
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {value!r}", "write [a, b] or a YAML list")
        item_type = args[0] if args else Any
        items = [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or kind is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}", "write {a: 1}")
        return dict(value)
    if kind is Any:
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(key, f"expected true or false, got {value!r}", "write true or false")
    if kind is int:
        if isinstance(value, bool) or not _is_integral(value):
            raise ConfigError(key, f"expected an integer, got {value!r}", "write a whole number")
        return int(float(value)) if isinstance(value, str) else int(value)
    if kind is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(key, f"expected a number, got {value!r}", "write e.g. 0.1 or 3e-4") from None
    if kind is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(key, f"expected a string, got {value!r}", "quote the value")
        return str(value)
    raise ConfigError(key, f"unsupported field type {kind!r}", "report this as a bug")


def _is_integral(value: Any) -> bool:
    if isinstance(value, int):
        return True
    if isinstance(value, float):
        return value.is_integer()
    if isinstance(value, str):
        try:
            return float(value).is_integer()
        except ValueError:
            return False
    return False


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else str(name)


def _deep_merge(into: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = value


# ---------------------------------------------------------------------------------------------
# Command-line plumbing shared by every sub-command that takes a config.


def add_config_arguments(parser: typing.Any) -> None:
    parser.add_argument("--config", help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides, e.g. optim.lr=3e-4 model.name=L/16")


def config_from_args(args: typing.Any) -> Config:
    return load_config(args.config, args.overrides)
