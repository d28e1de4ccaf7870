"""Typed configs: one pydantic model per component, with a docstring under every field.

Files and overrides become these models in t2v/configfile.py (`load_config`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
)


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
    """Probability that a clip tries a second object (captions then name both). It is only
    placed where its whole path stays clear of the first object (about half the tries at 32x32)."""
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


class TrainDataConfig(Section):
    """What a training run reads."""

    shards: str = ""
    """Latent shards (stage dit) or raw shards (stage vae, or dit with encode_on_the_fly)."""
    frames: int = Field(9, ge=1)
    """Clip length for raw shards (stage vae / on-the-fly encoding)."""
    size: int | None = Field(None, ge=2)
    """Square side for raw shards (None keeps the stored size)."""
    shuffle_seed: int = 0
    """Shard order of pass p = a permutation drawn from (shuffle_seed, p); see
    t2v/data/tarsource.py."""
    local_shuffle_buffer: int = Field(0, ge=0)
    """Rows in each worker's shuffle buffer (0 = off), seeded by (seed, pass)."""
    prefetch_batches: int = Field(4, ge=0)
    """Batches each worker's iterator fetches ahead of the one it trains on (Ray Data)."""
    passes_per_read: int | None = Field(None, ge=1)
    """Passes over the data in one Ray Data execution. Between executions every worker waits
    for the next to start (~0.4 s on 2 cores), which a data set of a few steps a pass pays
    often; a resumed run reads again from its execution's first pass. None: enough passes
    for >= 200 steps an execution (1 for any data set of 200 steps a pass or more), at most 64."""
    ordered: bool = True
    """Deterministic batches: Ray Data keeps block order (`preserve_order`), so every worker
    gets the same batches in every run, and a resumed run trains on exactly the batches an
    uninterrupted one would. False lets blocks arrive as reads finish (a slow read no longer
    holds the ones behind it up), and a resumed pass is then only approximately the same."""
    encode_on_the_fly: bool = False
    """Stage dit: read RAW shards and encode each batch in the worker with `vae` and the text
    encoder, instead of precomputed latent shards (`t2v encode`)."""
    text_encoder: str | None = None
    """Text encoder for encode_on_the_fly; None takes the `vae` package's, as `t2v encode`."""
    text_max_length: int | None = Field(None, ge=1)
    """Tokens per caption for encode_on_the_fly; None keeps the text encoder's."""


class OptimConfig(Section):
    lr: float = Field(3e-4, gt=0)
    betas: list[float] = [0.9, 0.99]
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "constant"] = "constant"
    """After warmup: cosine decay to min_lr_ratio * lr at `steps`, or constant."""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    grad_clip: float = Field(1.0, ge=0)
    """Global gradient-norm clip (0 = off)."""


class FaultConfig(Section):
    """Fault injection for tests: SIGKILL one worker process once, at a given step."""

    kill_at_step: int | None = Field(None, ge=1)
    kill_rank: int = Field(0, ge=0)


class LoRAConfig(Section):
    """Low-rank adapters (peft) on the DiT's linear layers; rank 0 = full fine-tuning."""

    rank: int = Field(0, ge=0)
    """Adapter rank r; 0 trains every weight instead."""
    alpha: float | None = Field(None, gt=0)
    """Scale numerator (the update is alpha / r * B @ A); None = rank."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapter input while training (peft's lora_dropout)."""
    target_modules: list[str] = ["qkv", "q", "kv", "out"]
    """Name suffixes of the VideoDiT nn.Linear layers that get adapters: `qkv` (fused self-
    attention), `q`, `kv` (cross-attention), `out` (both outputs) are every attention projection,
    Wan's to_q/to_k/to_v/to_out; add `ffn.fc1`, `ffn.fc2` for the feed-forward. A name that
    matches no layer is an error when the model is built."""
    merge_on_export: bool = True
    """True: the exported package's dit.safetensors has the adapters merged in; False: it keeps
    the base weights and the adapters go to lora.safetensors, merged when the package loads."""


class TrainConfig(Section):
    """`t2v train`: one Ray Train + DeepSpeed run (stage vae or dit)."""

    stage: Literal["vae", "dit"] = "dit"
    name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    """Run name: RUNS/NAME holds checkpoints, config.yaml, tb/, samples/, package/. One path
    segment of letters, digits, '.', '_', '-' (not starting with '.' or '-'), so a run never
    writes outside RUNS."""
    out: str = "runs"
    """RUNS: the storage_path of the run (local path or s3:// URI)."""
    model: str = "debug"
    """Preset name (DiT presets for stage dit, VAE presets for stage vae)."""
    model_overrides: dict[str, Any] = {}
    """Fields of the preset to change, e.g. {depth: 4}."""
    vae: str | None = None
    """Stage dit: the VAE package the latents were made with (exported with the DiT)."""
    init_from: str | None = None
    """A model package whose weights start this run (same geometry)."""
    data: TrainDataConfig = TrainDataConfig()
    batch_size: int = Field(4, ge=1)
    """Micro-batch per worker."""
    grad_accum: int = Field(1, ge=1)
    steps: int = Field(100, ge=1)
    optim: OptimConfig = OptimConfig()
    ema_decay: float = Field(0.999, ge=0, lt=1)
    ema_warmup: bool = True
    """EMA decay min(ema_decay, (1 + n) / (10 + n)) at update n, so short runs are usable."""
    zero_stage: int = Field(2, ge=0, le=3)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 on GPU, fp32 on CPU (bf16 is 2.6x slower than fp32 on CPUs without AMX)."""
    activation_checkpointing: bool = False
    sequence_parallel: int = Field(1, ge=1)
    """Stage dit: ranks that split each sample's video tokens between them (Ulysses all-to-all
    attention, t2v/train/parallel.py); it must divide num_workers (fixed, not [MIN, MAX]), the
    DiT's heads, and each node's worker count. The data-parallel replicas are num_workers / it;
    ZeRO shards over all workers."""
    dry_run: bool = False
    """Print the memory per rank this run needs (t2v/train/memory.py) and start nothing."""
    device_memory_gib: float = Field(80.0, gt=0)
    """Memory of one GPU, for the dry run's verdict (H100/A100-80G: 80)."""
    export_dtype: Literal["fp32", "bf16"] = "fp32"
    """DiT weights in the exported package: fp32, or bf16 (half the bytes: `large`'s 5.7 GB EMA
    becomes 2.9 GB). Checkpoints keep full precision either way."""
    seed: int = 0
    caption_dropout: float = Field(0.1, ge=0, le=1)
    """Probability a caption is replaced by "" (the unconditional input, for CFG)."""
    shift: float | None = Field(None, gt=0)
    """Stage dit: timestep shift of the logit-normal training t (SD3/Wan; 1 = none); None takes
    init_from's render shift, else 1. The package records it as its render shift."""
    kl_weight: float = Field(1e-6, ge=0)
    """Stage vae: weight of the KL term."""
    edge_weight: float = Field(0.0, ge=0)
    """Stage vae: weight of the edge term (L1 between the spatial differences of the
    reconstruction and the clip; CausalVideoVAE.loss): keeps small objects' outlines."""
    num_workers: int | tuple[int, int] = 2
    """Ray Train workers, or [MIN, MAX] for elastic training: Ray starts as many as fit (up to
    MAX, at least MIN) and after a failure restarts with what is left. Any worker count resumes
    any checkpoint; the global batch is kept through gradient accumulation where it divides."""
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    log_every: int = Field(10, ge=1)
    ckpt_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    val_every: int = Field(50, ge=1)
    val_samples: int = Field(2, ge=0)
    """Videos sampled at each validation (0 = held-out loss only)."""
    val_steps: int = Field(10, ge=1)
    """Sampler steps for validation videos."""
    max_failures: int = Field(2, ge=0)
    peak_flops: float | None = Field(None, gt=0)
    """Per-worker peak FLOP/s for the MFU estimate; None: 989e12 on GPU (H100 bf16 dense),
    2.6e11 on CPU (this project's 2-core reference machine, fp32 matmul, NOTES-stack)."""
    tracker: Literal["tensorboard", "mlflow", "wandb"] = "tensorboard"
    """Where rank 0 also logs the config, metrics and validation videos / contact sheets
    (RUN/tb/ is always written): mlflow (`tracker_uri`, else MLFLOW_TRACKING_URI, else a file
    store in RUN/mlruns) or wandb (WANDB_MODE=offline works without a network). The tracked
    run's id is kept in RUN/tracker.json, so a resumed run continues the same tracked run."""
    tracker_uri: str | None = None
    """MLflow tracking URI (a server URL or a local file store path)."""
    tracker_project: str = "t2v"
    """MLflow experiment / W&B project the run is logged under (the run is `name`)."""
    lora: LoRAConfig = LoRAConfig()
    fault: FaultConfig = FaultConfig()
    deepspeed: dict[str, Any] = {}
    """Merged, key by key, over the DeepSpeed config t2v generates (t2v/train/worker.py), e.g.
    `deepspeed.zero_optimization.reduce_bucket_size=200000000`."""
    ray_address: str | None = None

    @field_validator("num_workers")
    @classmethod
    def _workers(cls, v: int | tuple[int, int], info: ValidationInfo) -> int | tuple[int, int]:
        low, high = (v, v) if isinstance(v, int) else v
        if not 1 <= low <= high:
            raise ValueError(f"num_workers must be >= 1, or [MIN, MAX] with 1 <= MIN <= MAX; "
                             f"got {v}")
        sp = info.data.get("sequence_parallel", 1)  # validated before: declared above
        if sp > 1 and (not isinstance(v, int) or v % sp):
            raise ValueError(f"sequence_parallel={sp} needs a fixed num_workers that it divides")
        return v

    @property
    def min_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]


class RenderConfig(Section):
    """`t2v render`: a prompt file -> videos, posters and a manifest in object storage."""

    model: str = ""
    """Model package URI."""
    prompts: str = ""
    """Prompt file URI: .txt (a prompt a line), .jsonl, or .csv with a header."""
    out: str = ""
    """Output location: videos/, posters/, manifest/, summary.json, index.html."""
    steps: int | None = Field(None, ge=1, le=1000)
    """Sampler steps of a row without `steps`; None: the package's render default, else 30."""
    cfg: float | None = Field(None, ge=0, le=50)
    """Guidance scale of a row without `cfg`; None: the package's render default, else 5."""
    sampler: str | None = None
    """euler, heun, dpm_solver_2m or unipc (Wan's default: diffusers' UniPC schedule and
    timesteps); None: the package's render default, else euler."""
    shift: float | None = Field(None, gt=0)
    """Timestep shift of the sampling schedule (1 = none); None: the package's (the shift it was
    trained with; an imported Wan model records its scheduler's flow_shift)."""
    seed: int = 0
    """Base seed: a row without `seed` gets one derived from (seed, id)."""
    frames: int | None = Field(None, ge=1)
    """Frames of a row without `frames`; None: the package's (its training clip length)."""
    height: int | None = Field(None, ge=8)
    """None: the package's render height (the size it was trained at)."""
    width: int | None = Field(None, ge=8)
    """None: the package's render width."""
    negative_prompt: str = ""
    num_per_prompt: int = Field(1, ge=1, le=64)
    crf: int = Field(18, ge=0, le=51)
    fps: float | None = Field(None, gt=0)
    """Frame rate of the written videos; None: the package's (its training data's)."""
    batch_size: int = Field(4, ge=1)
    """Videos per sampler call (rows of equal shape and steps are batched together)."""
    concurrency: ActorPool = [1, 1]
    """[min, max] renderer actors (Ray Data autoscaling actor pool)."""
    gpus_per_worker: float = Field(0.0, ge=0)
    cpus_per_worker: float = Field(1.0, gt=0)
    overwrite: bool = False
    dry_run: bool = False
    truncate: bool = True
    """Prompts longer than the text encoder takes are cut (True) or become error rows (False)."""
    offload_text: bool = False
    """Keep the text encoder on the CPU and move it to the GPU only to encode a batch's prompts
    (a single GPU then holds umT5-xxl only while encoding)."""
    vae_chunk: int | None = Field(None, ge=1)
    """Decode a batch's videos one at a time, this many latent frames per pass (bounds VAE
    memory on one GPU); None decodes the whole batch at once."""
    vae_tile: int | None = Field(None, ge=8)
    """Decode in overlapping spatial tiles of this many pixels a side (a multiple of the VAE's
    spatial factor; neighbours share a quarter, blended): bounds VAE memory for large frames,
    close to but not exactly the untiled result. None: whole frames."""
    fail_after: int | None = Field(None, ge=0)
    """Test hook: a renderer actor raises after writing this many videos (fault injection)."""


class ServeConfig(Section):
    """`t2v serve`: the online API (Ray Serve) over a model package; results go to `out` as
    render writes them."""

    model: str = ""
    """Model package URI."""
    out: str = ""
    """Output location: videos/, posters/, manifest/ (as `t2v render` writes them)."""
    address: str | None = None
    """Ray cluster to join (None: RAY_ADDRESS, else a local Ray is started)."""
    host: str = "127.0.0.1"
    """Where Serve's HTTP proxy listens (0.0.0.0 to expose it)."""
    port: int = Field(8000, ge=1, le=65535)
    replicas: ActorPool = [1, 1]
    """[min, max] renderer replicas; Serve autoscales between them on queued requests."""
    target_queue: float = Field(2.0, gt=0)
    """Requests queued or running per renderer replica that autoscaling aims for."""
    max_batch_size: int = Field(4, ge=1)
    """Most videos in one sampler call (requests of one shape and steps are batched)."""
    batch_wait_s: float = Field(0.05, ge=0)
    """How long a renderer waits for a batch to fill before sampling what it has."""
    max_queue: int = Field(64, ge=1)
    """Videos queued or rendering at once; beyond this a request is answered 503 + Retry-After."""
    max_body_bytes: int = Field(16384, ge=256)
    """Largest request body accepted (413 beyond)."""
    api_token: str | None = None
    """Bearer token every /v1 request must carry; None: the T2V_API_TOKEN environment
    variable, and no token at all when that is unset too."""
    retries: int = Field(1, ge=0)
    """Times a video is sent again when the renderer replica holding it dies."""
    keep_videos: int = Field(10000, ge=1)
    """Finished videos whose state the ingress keeps in memory (the newest); an older one is
    read back from `out` (requests/ID.json) when asked for."""
    autoscaling: dict[str, Any] = {}
    """Merged over the renderer's generated Serve `autoscaling_config` (with MIN < MAX), e.g.
    `autoscaling.upscale_delay_s=5` (Serve's default 30 s), `downscale_delay_s`,
    `metrics_interval_s`, `look_back_period_s`; validated by Serve's AutoscalingConfig."""
    cpus_per_replica: float = Field(1.0, gt=0)
    gpus_per_replica: float = Field(0.0, ge=0)
    render: RenderConfig = RenderConfig()
    """Sampling and writing settings (steps, cfg, sampler, crf, offload_text, ...) as for
    `t2v render`; its model, prompts and out are not used."""
    blocking: bool = True
    """`t2v serve` stays in the foreground until interrupted (False: deploy and return)."""


class ImportConfig(Section):
    """`t2v import`: a pretrained checkpoint on disk or in a bucket -> a t2v model package."""

    wan: str = ""
    """A diffusers-format Wan 2.1 T2V folder/prefix (transformer/, vae/, text_encoder/,
    tokenizer/, model_index.json): a path, an s3:// URI, or a Hub id (hf:ORG/NAME[@REV], or
    ORG/NAME when no such local folder exists) read through the local Hugging Face cache."""
    out: str = ""
    """Where the model package goes (local path or s3:// URI)."""
    text_max_length: int = Field(512, ge=1)
    """Tokens per prompt for the umT5 encoder (Wan 2.1 was trained with 512)."""
    frames: int = Field(81, ge=1)
    """Default frames of a rendered video (1 + 4k; Wan 2.1 T2V: 81)."""
    height: int = Field(480, ge=8)
    """Default render height (Wan 2.1 T2V 1.3B: 480)."""
    width: int = Field(832, ge=8)
    """Default render width (Wan 2.1 T2V 1.3B: 832)."""
    fps: float = Field(16.0, gt=0)
    """Default frame rate of rendered videos (Wan 2.1 was trained at 16 fps)."""
    shift: float | None = Field(None, gt=0)
    """Timestep shift recorded as the render default; None takes the folder's scheduler
    `flow_shift` (Wan 2.1 ships 3.0 for 480p), or none if it has no scheduler."""
    steps: int = Field(50, ge=1, le=1000)
    """Default sampler steps (WanPipeline's default: 50)."""
    cfg: float = Field(5.0, ge=0, le=50)
    """Default guidance scale (WanPipeline's default: 5.0)."""


class ExportConfig(Section):
    """`t2v export --diffusers PKG OUT`: a model package -> a folder another library loads."""

    package: str = ""
    """The model package (local path or s3:// URI)."""
    out: str = ""
    """The folder written (local path or s3:// URI)."""
    format: Literal["diffusers"] = "diffusers"
    """diffusers: a WanPipeline folder (model_index.json, transformer/, vae/, text_encoder/,
    tokenizer/, scheduler/) that `WanPipeline.from_pretrained` loads; a LoRA package becomes
    `pytorch_lora_weights.safetensors` under diffusers/peft key names for `load_lora_weights`."""
    overwrite: bool = False
    """Replace an existing non-empty OUT (else it is an error)."""


class EvalConfig(Section):
    """`t2v eval`: score rendered videos against their prompts' ground truth (shapes data)."""

    renders: str = ""
    """A render job's output location (its manifest/ and videos/)."""
    prompts: str = ""
    """The prompt file that was rendered (rows with `meta` = ground-truth attributes)."""
    out: str | None = None
    """Where report.json, contact_sheet.png and gifs/ go (None: RENDERS/eval)."""
    model: str | None = None
    """The model package: adds VAE reconstruction PSNR, compression and held-out flow loss."""
    heldout: str | None = None
    """Raw shards of held-out clips for the VAE and flow-loss numbers (needs `model`)."""
    heldout_clips: int = Field(32, ge=1)
    """Clips of `heldout` used."""
    flow_t: list[float] = [0.25, 0.5, 0.75]
    """Fixed t values of the held-out flow loss."""
    sheet_rows: int = Field(48, ge=1)
    """Prompts (rows) on the contact sheet."""
    gifs: bool = True
    """Write a GIF per video under OUT/gifs/."""


class DemoConfig(Section):
    """`t2v demo`: synthetic data -> VAE -> latents -> DiT -> render held-out prompts -> eval.

    Every stage's settings are its own command's config (`vae.steps=...`, `render.cfg=...`);
    the demo fills in the paths. `quick` and `long` switch to other embedded profiles (see
    t2v/demo.py PROFILES); a key set on the command line or in --config wins over a profile.
    """

    out: str = "runs/demo"
    """Everything goes under here: data/, latents/, runs/, prompts/, renders/, eval/."""
    ray_address: str | None = None
    """Join this Ray cluster; None starts a local one."""
    num_cpus: int | None = None
    """Logical CPUs for a local Ray instance (None: Ray counts cores)."""
    quick: bool = False
    """CI-sized run (a few minutes): checks the whole pipeline, not the quality bar."""
    long: bool = False
    """64x64 clips of 17 frames and longer training (<= 45 min on a 2-core laptop)."""
    verbose: bool = False
    """Show Ray's, DeepSpeed's and torch's own output too. Without it the terminal shows only
    our progress lines; everything else goes to OUT/logs/demo.log."""
    heldout_combos: int = Field(12, ge=1, le=60)
    """Colour x shape x motion combinations kept out of training and rendered for eval."""
    seeds_per_combo: int = Field(8, ge=1)
    """Videos rendered per held-out combination (one prompt row each, its own seed)."""
    train_combos: int = Field(6, ge=0, le=60)
    """Combinations seen in training also rendered (seeds_per_combo each) and scored apart:
    memorisation beside composition in the report."""
    heldout_clips: int = Field(32, ge=1)
    """Generator clips of the held-out combinations, for the VAE PSNR and flow-loss numbers."""
    synth: SynthConfig = Field(default_factory=SynthConfig)
    vae: TrainConfig = Field(default_factory=lambda: TrainConfig(stage="vae", name="vae"))
    encode: EncodeConfig = Field(default_factory=EncodeConfig)
    dit: TrainConfig = Field(default_factory=lambda: TrainConfig(stage="dit", name="dit"))
    render: RenderConfig = Field(default_factory=RenderConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
