"""Configs of the data commands: `t2v data synth`, `t2v pack`, the shard reader, `t2v encode`."""

from __future__ import annotations

from pydantic import Field, ValidationInfo, field_validator, model_validator

from t2v.config.base import ActorPool, Section


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
    """Probability that a clip tries a second object (captions then name both). It is only
    placed where its whole path stays clear of the first object (about half the tries at 32x32)."""
    exclude: list[str] = []
    """Colour-shape-motion combinations never generated, e.g. "red circle left"."""
    only: list[str] = []
    """If set, generate only these combinations (the held-out set)."""
    crf: int = Field(18, ge=0, le=51)
    travel: tuple[float, float] = (0.35, 0.5)
    """How far a moving object goes over a clip: [min, max] fractions of the frame side, one
    drawn per object (the detector calls under 0.15 "still")."""
    radius: tuple[float, float] = (0.14, 0.2)
    """An object's radius (half its extent): [min, max] fractions of the frame side, one drawn
    per object (a square's side is 1.8 radii). A moving object's path that would leave the
    frame is shortened to fit."""
    alt_captions: bool = False
    """Also write each clip's shorter captions (without colour, without motion, the shape
    alone) to its json `captions`, for training with alt_caption_prob."""

    @field_validator("travel")
    @classmethod
    def _travel(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1] <= 0.6:
            raise ValueError(f"travel must be [min, max] with 0 < min <= max <= 0.6, got {list(v)}")
        return v

    @field_validator("radius")
    @classmethod
    def _radius(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.05 <= v[0] <= v[1] <= 0.35:
            raise ValueError(f"radius must be [min, max] with 0.05 <= min <= max <= 0.35, "
                             f"got {list(v)}")
        return v

    @model_validator(mode="after")
    def _fits(self) -> SynthConfig:
        # A path longer than the frame leaves an object is shortened to fit (synthetic._place);
        # the shortest one asked for must fit whole.
        if 2 * self.radius[1] + self.travel[0] > 0.9:
            raise ValueError(f"an object of radius {self.radius[1]} travelling {self.travel[0]} "
                             f"of the frame leaves it: keep 2 * radius max + travel min <= 0.9")
        return self


class PackConfig(Section):
    """Pack a folder or bucket prefix of videos + captions into raw shards (`t2v pack`)."""

    src: str = ""
    """Folder or s3:// prefix holding the videos (searched recursively)."""
    out: str = ""
    """Where the shards go."""
    captions: str | None = None
    """A captions.jsonl / .csv (path, caption; a jsonl row may add `captions`, a list of other
    captions of the clip); default: SRC/captions.{jsonl,csv} or NAME.txt."""
    shard_size: int = Field(64, ge=1)
    fps: float | None = Field(None, gt=0)
    """Resample to this frame rate (None keeps the source rate)."""
    frames: int | None = Field(None, ge=1)
    """Keep at most this many frames from the start of each clip."""
    min_frames: int = Field(1, ge=1)
    """Clips with fewer decodable frames are skipped as too short."""
    size: list[int] | None = None
    """[height, width]: resize to cover, then centre crop. None keeps the source size."""
    buckets: str | list[str] | None = None
    """Duration/resolution buckets instead of one `size`/`frames`: a preset (`debug`: <= 64 px,
    <= 17 frames; `480p`: Wan's 480p sizes both ways and square, 33/49/81 frames) or
    FRAMESxHEIGHTxWIDTH,... Each clip goes to the bucket that trims and crops it the least
    (t2v/data/buckets.py); a clip shorter than every bucket is skipped with that reason."""
    crf: int = Field(18, ge=0, le=51)
    concurrency: int | None = Field(None, ge=1)
    """Parallel pack tasks (None: Ray decides)."""

    @field_validator("size")
    @classmethod
    def _size_pair(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (len(v) != 2 or min(v) < 2):
            raise ValueError(f"size must be [height, width] with both >= 2, got {v}")
        return v

    @field_validator("buckets")
    @classmethod
    def _buckets(cls, v: str | list[str] | None, info: ValidationInfo) -> str | list[str] | None:
        if v is None:
            return v
        from t2v.data.buckets import parse_buckets  # noqa: PLC0415 - the config stays light

        parse_buckets(v)  # raises naming the bad bucket
        clash = [k for k in ("frames", "size") if info.data.get(k) is not None]
        if clash:
            raise ValueError(f"buckets set each clip's {' and '.join(clash)}: drop {clash[0]}=")
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


class EncodeConfig(Section):
    """Latent precompute (`t2v encode`): raw shards -> latent shards, one output per input shard."""

    src: str = ""
    """Raw shards (local or s3://)."""
    out: str = ""
    """Where the latent shards go."""
    vae: str = ""
    """A model package holding the VAE (a VAE-only package from `stage: vae` is fine)."""
    text_encoder: str | None = None
    """Text-encoder reference; None takes the package's (`builtin:minilm` by default)."""
    text_max_length: int | None = Field(None, ge=1)
    """Override the package's max_length (tokens per caption)."""
    frames: int | None = Field(None, ge=1)
    """Clip length to encode (1 + 4k); None keeps each clip's stored length (cut to 1 + 4k)."""
    size: int | None = Field(None, ge=2)
    """Square side to resize/crop to before encoding; None keeps the stored size."""
    batch_size: int = Field(8, ge=1)
    """Clips per VAE forward."""
    concurrency: ActorPool = [1, 1]
    """[min, max] encoder actors."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs per encoder actor (0 on CPU clusters)."""
    num_cpus: float = Field(1.0, gt=0)
    """CPUs per encoder actor."""
    sample: bool = False
    """Store the posterior MEAN (False, the contract) or a sample (True)."""
