"""Typed configs: one pydantic model per component, YAML files plus dotted overrides.

Every job takes `--config FILE.yaml [dotted.key=value ...]`. Errors are one line naming the file
and the key, because the user's next action is to open that file at that key.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

C = TypeVar("C", bound=BaseModel)


class ConfigError(ValueError):
    """A config file or override the job cannot use; the message is one line."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----------------------------------------------------------------------------- data


class SynthConfig(Section):
    """Synthetic shapes data set (`t2v data synth`)."""

    out: str = "runs/demo/shards"
    """Where the raw shards go (local path or s3:// URI)."""
    num: int = Field(256, ge=1)
    """Number of clips."""
    frames: int = Field(9, ge=1)
    """Frames per clip (1 + 4k suits the causal VAE)."""
    size: int = Field(32, ge=8)
    """Square frame side in pixels."""
    fps: float = Field(8.0, gt=0)
    seed: int = 0
    shard_size: int = Field(64, ge=1)
    """Samples per shard tar."""
    two_object_prob: float = Field(0.0, ge=0.0, le=1.0)
    """Probability that a clip holds a second object (captions then name both)."""
    exclude: list[str] = []
    """Colour-shape-motion combinations never generated, e.g. "red circle left"."""
    only: list[str] = []
    """If set, generate only these combinations (the held-out set)."""
    crf: int = Field(18, ge=0, le=51)


class PackConfig(Section):
    """Pack a folder or bucket prefix of videos + captions into raw shards (`t2v pack`)."""

    src: str = ""
    """Folder or s3:// prefix holding the videos (searched recursively)."""
    out: str = ""
    """Where the shards go."""
    captions: str | None = None
    """A captions.jsonl / .csv (path, caption); default: SRC/captions.{jsonl,csv} or NAME.txt."""
    shard_size: int = Field(64, ge=1)
    fps: float | None = Field(None, gt=0)
    """Resample to this frame rate (None keeps the source rate)."""
    frames: int | None = Field(None, ge=1)
    """Keep at most this many frames from the start of each clip."""
    min_frames: int = Field(1, ge=1)
    """Clips with fewer decodable frames are skipped as too short."""
    size: list[int] | None = None
    """[height, width]: resize to cover, then centre crop. None keeps the source size."""
    crf: int = Field(18, ge=0, le=51)
    concurrency: int | None = Field(None, ge=1)
    """Parallel pack tasks (None: Ray decides)."""

    @field_validator("size")
    @classmethod
    def _size_pair(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (len(v) != 2 or min(v) < 2):
            raise ValueError(f"size must be [height, width] with both >= 2, got {v}")
        return v


class ReaderConfig(Section):
    """Ray Data streaming of raw shards into torch batches."""

    shards: str = "runs/demo/shards"
    batch_size: int = Field(8, ge=1)
    frames: int = Field(9, ge=1)
    """Clip length delivered; shorter samples are skipped and counted."""
    size: int | None = Field(None, ge=2)
    """Square side to resize/crop to (None keeps the stored size)."""
    fps: float | None = Field(None, gt=0)
    shuffle_seed: int | None = None
    """Shuffle shard order (file level) with this seed; None keeps order."""
    max_block_mb: int = Field(16, ge=1)
    """Ray Data block size cap for decoded clips (bounds memory in flight)."""


class DemoConfig(Section):
    """`t2v demo`: the README's first command."""

    out: str = "runs/demo"
    ray_address: str | None = None
    """Join this Ray cluster; None starts a local one."""
    num_cpus: int | None = None
    """Logical CPUs for a local Ray instance (None: Ray counts cores)."""
    synth: SynthConfig = SynthConfig()
    reader: ReaderConfig = ReaderConfig()


# ----------------------------------------------------------------------------- loading


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
    from t2v import storage

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
    from t2v import storage

    storage.write_text(uri, to_yaml(cfg))
