"""Config files: YAML (local or s3://) plus dotted `key=value` overrides -> a typed config from
t2v/config.py, or one `ConfigError` line.

Every job takes `--config FILE.yaml [dotted.key=value ...]`. Errors are one line naming the file
and the key, because the user's next action is to open that file at that key.
"""

from __future__ import annotations

import json
import textwrap
import types
import typing
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticUndefined

from t2v import storage

C = TypeVar("C", bound=BaseModel)


class ConfigError(ValueError):
    """A config file or override the job cannot use; the message is one line."""


def _set_dotted(tree: dict[str, Any], key: str, value: Any, source: str) -> None:
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"{source}: bad override key {key!r} (empty part)")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: override {key!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str], source: str = "command line") -> dict[str, Any]:
    """`["a.b=3", "c=[1,2]"]` -> nested dict; values are parsed as YAML scalars/flow lists."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or " " in key:
            raise ConfigError(f"{source}: bad override {item!r} (expected dotted.key=value)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            msg = str(e).splitlines()[0]
            raise ConfigError(f"{source}: override {key}: cannot parse {raw!r}: {msg}") from None
        _set_dotted(tree, key, value, source)
    return tree


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _read_yaml(path: str) -> dict[str, Any]:
    try:
        text = storage.read_text(path)
    except storage.StorageError as e:
        raise ConfigError(f"config {e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}{where}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "<root>"
    kind = first["type"]
    if kind == "extra_forbidden":
        msg = "unknown key"
    else:
        msg = first["msg"]
        if "input" in first and kind != "missing":
            msg += f" (got {first['input']!r})"
    more = len(err.errors()) - 1
    tail = f" (+{more} more)" if more else ""
    return f"{source}: {key}: {msg}{tail}"


def load_config(cls: type[C], path: str | None = None, overrides: list[str] | None = None) -> C:
    """Build `cls` from a YAML file (local or s3://) plus dotted overrides, or raise ConfigError."""
    data = _read_yaml(path) if path else {}
    ov = parse_overrides(overrides or [])
    merged = deep_merge(data, ov)
    source = path or "defaults"
    if ov:
        source += " + overrides"
    try:
        return cls.model_validate(merged)
    except ValidationError as e:
        raise ConfigError(_format_error(e, source)) from None


def to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False)


def save_resolved(cfg: BaseModel, uri: str) -> None:
    """Write the resolved config beside a job's outputs (atomically)."""
    storage.write_text(uri, to_yaml(cfg))


def type_name(annotation: Any) -> str:
    """A config field's type as a user reads it: `int`, `str | None`, `"vae" | "dit"`,
    `list[int]`, `dict[str, Any]`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join(type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if annotation is type(None):
        return "None"
    if annotation is Any:
        return "Any"
    return getattr(annotation, "__name__", str(annotation))


def _bounds(metadata: list[Any]) -> str:
    """Field constraints as " (>= 1, < 1)"."""
    ops = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("pattern", "matching"))
    parts = [f"{op} {getattr(m, attr)}" for m in metadata for attr, op in ops
             if getattr(m, attr, None) is not None]
    return f" ({', '.join(parts)})" if parts else ""


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def config_keys(cls: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """Every key of a config class, nested sections flattened to dotted keys, as
    (key, type, default, doc) in declaration order."""
    rows: list[tuple[str, str, str, str]] = []
    for name, field in cls.model_fields.items():
        key = prefix + name
        if _is_section(field.annotation):
            rows += config_keys(field.annotation, key + ".")
            continue
        if field.default is PydanticUndefined and field.default_factory is None:
            default = "(required)"
        else:
            value = field.get_default(call_default_factory=True)
            default = json.dumps(value, default=str)
        doc = " ".join((field.description or "").split())
        rows.append((key, type_name(field.annotation) + _bounds(field.metadata), default, doc))
    return rows


def config_help(cls: type[BaseModel], command: str, flags: dict[str, str] | None = None) -> str:
    """`t2v COMMAND --help-config`: every key with its type, default and doc (and the
    command-line flag that sets it, from `flags`: --flag -> key)."""
    alias = {key: flag for flag, key in (flags or {}).items()}
    head = cls.__doc__.strip().splitlines()[0] if cls.__doc__ else command
    lines = [f"{head}", "",
             f"Keys of `t2v {command}` (YAML via --config FILE, or key=value on the command "
             "line; nested keys are dotted):", ""]
    for key, kind, default, doc in config_keys(cls):
        flag = f"  (--{alias[key]})" if key in alias else ""
        lines.append(f"  {key}: {kind} = {default}{flag}")
        lines += textwrap.wrap(doc, 96, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)
