"""The base of every config section, and shared field types."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True,
                              use_attribute_docstrings=True)
    """The docstring under a field is its description (`t2v CMD --help-config`, JSON schema)."""


def _check_min_max(v: list[int]) -> list[int]:
    """An actor-pool size: [min, max] with 1 <= min <= max (Ray Data's `concurrency`)."""
    if len(v) != 2 or not 1 <= v[0] <= v[1]:
        raise ValueError(f"concurrency must be [min, max] with 1 <= min <= max, got {v}")
    return v


def _parse_min_max(v: object) -> object:
    """`--concurrency 1,4` (YAML reads "1,4" as text) or a single N -> [min, max]."""
    if isinstance(v, str):
        parts = [p.strip() for p in v.split(",")]
        if all(p.isdigit() for p in parts) and len(parts) in (1, 2):
            return [int(parts[0]), int(parts[-1])]
    if isinstance(v, int):
        return [v, v]
    return v


ActorPool = Annotated[list[int], BeforeValidator(_parse_min_max), AfterValidator(_check_min_max)]
"""A Ray Data actor pool's [min, max] size, also given as "1,4" or N."""
