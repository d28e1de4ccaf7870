"""The config of `t2v train` (Ray Train + DeepSpeed, stage vae or dit) and its sections."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from t2v.config.base import Section


class TrainDataConfig(Section):
    """What a training run reads."""

    shards: str = ""
    """Latent shards (stage dit) or raw shards (stage vae, or dit with encode_on_the_fly)."""
    frames: int = Field(9, ge=1)
    """Clip length for raw shards (stage vae / on-the-fly encoding)."""
    size: int | None = Field(None, ge=2)
    """Square side for raw shards (None keeps the stored size)."""
    crop: list[int] | None = None
    """Stage vae: [frames, side]: each clip of a batch trains as its own random window of
    `frames` frames (1 + k x the VAE's temporal factor) and `side` x `side` pixels (a multiple
    of its spatial factor), drawn from (seed, step, the clip's key). The VAE is convolutional,
    so what it learns on windows holds on whole clips, which validation, the latent statistics
    and the export use; a step costs about the window's share of a clip. None: whole clips.
    Check the DiT on its latents before adopting: 9x32x32 windows of 17x64x64 clips raised the
    VAE's PSNR but cost the DiT's motion (BENCHMARKS.md round 12)."""
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

    @field_validator("crop")
    @classmethod
    def _crop(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (len(v) != 2 or v[0] < 1 or v[1] < 2):
            raise ValueError("crop must be [frames, side] with frames >= 1 and side >= 2")
        return v


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
    fused: bool = True
    """torch's fused AdamW kernel (one pass over each tensor; on CPU ~7x the speed of the
    per-tensor loop at the demo's DiT size) where the parameters' device has it (CPU, CUDA);
    false: torch's default implementation."""


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
    compile: bool = False
    """Stage dit: `torch.compile` each DiT block (VideoDiT.compile_blocks) before training: the
    debug DiT's steps 1.16-1.32x faster on a 2-core CPU, after ~40-60 s of compiling the first
    time (inductor's cache, /tmp/torchinductor_$USER, makes later runs of the same shapes start
    in seconds; BENCHMARKS.md, training overhead round 13). ZeRO 0-2, no sequence parallelism;
    on a CPU it needs a C++ compiler (g++, or $CXX)."""
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
    alt_caption_prob: float = Field(0.0, ge=0, le=1)
    """Stage dit: probability a sample trains on one of its alternative captions (the raw
    sample's json `captions`, e.g. shorter ones; latent shards' text_alt), drawn uniformly,
    instead of its caption. Samples without alternatives keep theirs."""
    shift: float | None = Field(None, gt=0)
    """Stage dit: timestep shift of the logit-normal training t (SD3/Wan; 1 = none); None takes
    init_from's render shift, else 1. The package records it as its render shift."""
    kl_weight: float = Field(1e-6, ge=0)
    """Stage vae: weight of the KL term."""
    l1_weight: float = Field(1.0, ge=0)
    """Stage vae: weight of the pixels' L1 term."""
    mse_weight: float = Field(1.0, ge=0)
    """Stage vae: weight of the pixels' squared-error term, the one PSNR measures (near 32 dB
    L1's gradient outweighs MSE's ~10 to 1). 4 on `--long`'s VAE led by 0.8 dB half-way and
    ended 0.3 dB under 1 (BENCHMARKS.md round 17)."""
    edge_weight: float = Field(0.0, ge=0)
    """Stage vae: weight of the edge term (L1 between the spatial differences of the
    reconstruction and the clip; CausalVideoVAE.loss): keeps small objects' outlines."""
    scale_weight: float = Field(0.0, ge=0)
    """Stage vae: weight of the scale-equivariance term (the latents pooled 2x in space decode
    to the clip pooled 2x; CausalVideoVAE.loss): latents a DiT can learn as the VAE improves,
    for 1-2 dB of PSNR (BENCHMARKS.md round 14)."""
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
    poll_s: float = Field(0.5, gt=0, le=60)
    """How often Ray Train's controller polls the workers (its RAY_TRAIN_HEALTH_CHECK_INTERVAL_S,
    2 s by default): a report with a checkpoint, the end of the run and a failure are taken up
    within this. 0.5 s took ~5 s off a 4-step run with 2 checkpoints (BENCHMARKS.md "Start-up
    of a Ray Train run"); a missed poll is only a late one (a worker is declared dead after
    RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S, 10 minutes)."""
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
