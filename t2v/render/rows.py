"""The typed rows of rendering: what a prompt line gives (`RowFields`), a valid row with its
defaults (`PromptRow`), one video to render (`Sample`, which crosses from the driver to renderer
actors as validated JSON) and the job-wide settings every manifest row records (`RenderJob`).

Pure: pydantic only. Parsing and the per-line error rows are t2v/render/prompts.py.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, TypeAdapter


class RowFields(BaseModel):
    """What one line gives, typed: JSON values strictly ("7" is not an integer), CSV cells after
    `_check_csv_types`. Fields a line leaves out (or sets to null) are None."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    prompt: str
    id: str | None = None
    negative_prompt: str | None = None
    seed: int | None = None
    steps: int | None = None
    cfg: float | None = None
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    meta: dict[str, Any] | None = None

    def given(self) -> dict:
        """The fields the line gave (what a derived id hashes)."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


class BatchKey(NamedTuple):
    """Videos that may share one sampler call: same shape and steps, and all guided (cfg != 1)
    or none (an unguided batch runs the conditional half only)."""

    frames: int
    height: int
    width: int
    steps: int
    guided: bool


class VideoSettings(BaseModel):
    """What one video depends on besides the model: prompts, seed, sampler steps, guidance,
    shape, and the free `meta` a row carries into its manifest row."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str
    negative_prompt: str = ""
    seed: int
    steps: int
    cfg: float
    frames: int
    height: int
    width: int
    meta: dict[str, Any] = {}


class Sample(VideoSettings):
    """One video to render, every default filled in: what travels from the plan to a renderer
    actor (as JSON validated on arrival, `SAMPLES`) and into its manifest row."""

    id: str
    prompt_id: str | None = None
    """The row's id (differs from `id` with num_per_prompt > 1: `{prompt_id}-{sample}`)."""
    sample: int = 0
    line: int = 0

    @property
    def batch_key(self) -> BatchKey:
        return BatchKey(self.frames, self.height, self.width, self.steps, self.cfg != 1.0)


SAMPLES = TypeAdapter(list[Sample])
"""The wire format of a batch of samples (JSON bytes) between the driver and renderer actors."""


class PromptRow(VideoSettings):
    """A valid row of a prompt file, defaults filled in."""

    line: int
    id: str

    def samples(self, num_per_prompt: int) -> list[Sample]:
        """The videos this row asks for: one, or `num_per_prompt` with ids `{id}-{k}`."""
        base = self.model_dump(exclude={"id", "seed"}) | {"prompt_id": self.id}
        if num_per_prompt == 1:
            return [Sample(**base, id=self.id, sample=0, seed=self.seed)]
        return [Sample(**base, id=f"{self.id}-{k}", sample=k, seed=self.seed + k)
                for k in range(num_per_prompt)]


class RenderJob(BaseModel):
    """Settings of one render job that every manifest row records."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    package_hash: str
    sampler: str
    shift: float
    fps: float
    crf: int
    run: str
    """The job's run id (UTC start time + suffix): names its manifest part files."""
    source: str
    """The prompt file."""
