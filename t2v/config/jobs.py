"""Configs of render, serve, import, export, eval and the demo."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from t2v.config.base import ActorPool, Section
from t2v.config.data import EncodeConfig, SynthConfig
from t2v.config.train import TrainConfig


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
    """64x64 clips of 17 frames and longer training (35-45 min on a 2-core AVX-512 laptop,
    47-70 on an AVX2-only one, by its speed that hour: BENCHMARKS.md)."""
    verbose: bool = False
    """Show Ray's, DeepSpeed's and torch's own output too. Without it the terminal shows only
    our progress lines; everything else goes to OUT/logs/demo.log."""
    heldout_combos: int = Field(12, ge=1, le=60)
    """Colour x shape x motion combinations kept out of training and rendered for eval."""
    seeds_per_combo: int = Field(8, ge=1)
    """Videos rendered per held-out combination (one prompt row each, its own seed)."""
    train_combos: int = Field(6, ge=0, le=60)
    """Combinations seen in training also rendered (seeds_per_combo each) and scored apart:
    memorisation beside composition in the report. Matched to the held-out ones (the same
    shapes and motions, other colours), so the two columns compare like with like."""
    heldout_clips: int = Field(32, ge=1)
    """Generator clips of the held-out combinations, for the VAE PSNR and flow-loss numbers."""
    synth: SynthConfig = Field(default_factory=SynthConfig)
    vae: TrainConfig = Field(default_factory=lambda: TrainConfig(stage="vae", name="vae"))
    encode: EncodeConfig = Field(default_factory=EncodeConfig)
    dit: TrainConfig = Field(default_factory=lambda: TrainConfig(stage="dit", name="dit"))
    render: RenderConfig = Field(default_factory=RenderConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
