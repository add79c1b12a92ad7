"""One typed config tree, from YAML file(s) plus dotted command-line overrides.

    vitscale config show --config configs/vit_b16_i21k.yaml optim.lr=3e-4 model.drop_path=0.1

Each component owns its section dataclass (`ModelConfig` in vitscale/model, `DataConfig` in
vitscale/data, ...); this module composes them, coerces every value to the field's declared type,
and turns every mistake into a `ConfigError` naming the dotted key and the fix. A YAML file may
start from another with `base: other.yaml` (relative to the file), so a tiny variant only lists
what it changes. The resolved tree is saved with every run and checkpoint (`save_config`).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import io
import re
import textwrap
import tokenize
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
    # The run's name: its directory below output_dir (and the vitscale_run label of its
    # Prometheus targets).
    name: str = "vitscale"
    # Everything a run writes (config.yaml, logs, checkpoints) goes below output_dir/name.
    output_dir: str = "runs"
    # Seeds initialisation, data order and augmentation (each sample's augmentation from seed,
    # epoch and sample index, so a resumed run draws what the uninterrupted one would have).
    seed: int = 0
    # Optimizer steps to train for; the schedule's horizon unless schedule.total_steps is set.
    steps: int = 1000
    # Print a progress line and append a record to log.jsonl every N steps.
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
# Field documentation: the comments written above (or beside) each field of the dataclasses.


def field_docs(cls: type) -> dict[str, str]:
    """{field: its documentation} read from the class's source. A comment block documents the
    field right below it and the fields that follow it line after line (one block for a group
    such as checkpoint_every/keep_last); a comment at the end of the field's line is appended."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    trailing = {token.start[0]: token.string.lstrip("#").strip()
                for token in tokenize.generate_tokens(io.StringIO(source).readline)
                if token.type == tokenize.COMMENT and lines[token.start[0] - 1].strip()[:1] != "#"}
    docs: dict[str, str] = {}
    group, previous_end = "", -1
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            group, previous_end = "", -1
            continue
        above, row = [], node.lineno - 2
        while row >= 0 and lines[row].strip().startswith("#"):
            above.insert(0, lines[row].strip().lstrip("#").strip())
            row -= 1
        if above:
            group = " ".join(above)
        elif node.lineno - 1 != previous_end:
            group = ""  # a blank line or other code since the last documented field
        docs[node.target.id] = " ".join(part for part in (group, trailing.get(node.lineno, "")) if part)
        previous_end = node.end_lineno
    return docs


def explain(config: Config, keys: typing.Sequence[str]) -> str:
    """Each field below the dotted keys (a section or a leaf; none: the whole tree) with its type,
    default, the configured value and its documentation."""
    out = []
    for key in keys or [""]:
        node, cls, prefix = config, Config, ""
        for part in (key.split(".") if key else []):
            names = [f.name for f in dataclasses.fields(cls)]
            if not dataclasses.is_dataclass(node) or part not in names:
                close = difflib.get_close_matches(_join(prefix, part), _all_keys(Config), n=1)
                raise ConfigError(key, "unknown key", f"did you mean {close[0]}?" if close else
                                  "`vitscale config explain` lists every key")
            prefix = _join(prefix, part)
            node = getattr(node, part)
            cls = type(node) if dataclasses.is_dataclass(node) else cls
        if dataclasses.is_dataclass(node):
            out.extend(_explain_section(node, prefix))
        else:
            section, name = prefix.rpartition(".")[0], prefix.rpartition(".")[2]
            owner = config
            for part in section.split(".") if section else []:
                owner = getattr(owner, part)
            out.append(_explain_field(owner, name, prefix))
    return "\n".join(out) + "\n"


def _explain_section(section: Any, prefix: str) -> list[str]:
    out = []
    for item in dataclasses.fields(section):
        value = getattr(section, item.name)
        if dataclasses.is_dataclass(value):
            out.extend(_explain_section(value, _join(prefix, item.name)))
        else:
            out.append(_explain_field(section, item.name, _join(prefix, item.name)))
    return out


def _explain_field(section: Any, name: str, key: str) -> str:
    item = next(f for f in dataclasses.fields(section) if f.name == name)
    default = item.default if item.default is not dataclasses.MISSING else (
        item.default_factory() if item.default_factory is not dataclasses.MISSING else None)
    kind = typing.get_type_hints(type(section))[name]
    kind_text = getattr(kind, "__name__", None) if isinstance(kind, type) else str(kind).replace("typing.", "")
    value = getattr(section, name)
    setting = f"default {_yaml_scalar(default)}" + ("" if value == default else f", configured {_yaml_scalar(value)}")
    doc = field_docs(type(section)).get(name) or "(no documentation)"
    return f"{key}: {kind_text} ({setting})\n" + textwrap.fill(doc, 96, initial_indent="    ", subsequent_indent="    ")


def _yaml_scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip()


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        keys.append(_join(prefix, item.name))
        if dataclasses.is_dataclass(hints[item.name]):
            keys.extend(_all_keys(hints[item.name], _join(prefix, item.name)))
    return keys


# ---------------------------------------------------------------------------------------------
# Command-line plumbing shared by every sub-command that takes a config.


def add_config_arguments(parser: typing.Any) -> None:
    parser.add_argument("--config", help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides, e.g. optim.lr=3e-4 model.name=L/16")


def config_from_args(args: typing.Any) -> Config:
    return load_config(args.config, args.overrides)
