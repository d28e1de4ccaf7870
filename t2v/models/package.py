"""Model packages: what render and eval load with one `--model URI` (DESIGN.md "Contracts").

A package is a folder or prefix holding
    model.json        format version, DiT config, VAE config (incl. latent scale/shift), a
                      `diffusers:URI` VAE reference for an imported VAE, text-encoder config,
                      render defaults (the geometry the DiT was trained at or imported with,
                      fps, shift, optional steps/cfg/sampler), LoRA rank/alpha, training run
                      and step
    dit.safetensors   the (EMA) DiT weights       (absent in a VAE-only package)
    vae.safetensors   the VAE weights             (absent when the VAE is a diffusers reference)
    lora.safetensors  optional LoRA adapters, kept apart from the base weights in
                      dit.safetensors; `load_package` merges them into the DiT it returns
An imported VAE (`vae_ref`) is described in model.json by a WanVAEConfig (latent channels,
factors, normalisation) and loaded from its reference by the diffusers backend (wan_vae.py).
Weights are safetensors only: nothing is ever unpickled. `model.json` is written last, so a
package without it is incomplete. The content hash (sha256 over model.json and the weight
files, in a fixed order) identifies the package in every manifest row.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from t2v import storage
from t2v.models.dit import DiTConfig, VideoDiT
from t2v.models.lora import lora_scale, merge_into, merge_lora
from t2v.models.text import TextEncoder, TextEncoderConfig
from t2v.models.vae import CausalVideoVAE, VAEConfig
from t2v.models.wan_vae import WanVAE, WanVAEConfig, parse_ref

FORMAT_VERSION = 2
"""2 added the typed `render` section; version 1 packages are migrated on read (`_migrate_v1`)."""
READ_VERSIONS = (1, 2)
MODEL_JSON = "model.json"
WEIGHT_FILES = ("dit.safetensors", "vae.safetensors", "lora.safetensors")


class PackageError(ValueError):
    """A package that cannot be loaded; the message names the URI and what is wrong."""


@dataclass(frozen=True)
class RenderDefaults:
    """How a package renders when neither a prompt row nor a flag says otherwise.

    The geometry is the one the DiT was trained at (training export reads it off the data the
    run saw) or imported with; render, eval, serve and the demo take it from here. steps, cfg
    and sampler are optional: None leaves them to the renderer's own defaults.
    """

    frames: int
    height: int
    width: int
    fps: float
    shift: float = 1.0
    """Timestep shift of the sampling schedule (1 = none)."""
    steps: int | None = None
    cfg: float | None = None
    sampler: str | None = None
    buckets: list[str] | None = None
    """FRAMESxHEIGHTxWIDTH of every bucket the DiT trained on, when more than one (the geometry
    above is the one with the most samples); a prompt row may ask for any of them."""

    def __post_init__(self) -> None:
        for name in ("frames", "height", "width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"render.{name} must be a positive integer, got {value!r}")
        for name in ("fps", "shift"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"render.{name} must be a number > 0, got {value!r}")
        if self.steps is not None and (isinstance(self.steps, bool) or self.steps < 1):
            raise ValueError(f"render.steps must be >= 1, got {self.steps!r}")
        if self.cfg is not None and not self.cfg >= 0:
            raise ValueError(f"render.cfg must be >= 0, got {self.cfg!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["buckets"] is None:  # one geometry: model.json as before buckets existed
            del d["buckets"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> RenderDefaults:
        names = {f.name for f in fields(cls)}
        unknown, missing = set(d) - names, {"frames", "height", "width", "fps"} - set(d)
        if unknown or missing:
            raise ValueError(f"render: unknown keys {sorted(unknown)}" if unknown
                             else f"render: missing keys {sorted(missing)}")
        return cls(**d)


def _migrate_v1(run: dict) -> RenderDefaults | None:
    """A version-1 package kept its geometry in `run` (imported ones did; trained ones did only
    when copied from `init_from`); a package without it has no render defaults."""
    if "frames" not in run or not ({"height", "width"} <= set(run) or "size" in run):
        return None
    return RenderDefaults(frames=int(run["frames"]),
                          height=int(run.get("height") or run["size"]),
                          width=int(run.get("width") or run["size"]),
                          fps=float(run.get("fps") or 8.0), shift=float(run.get("shift") or 1.0))


@dataclass
class PackageMeta:
    dit: DiTConfig | None
    vae: VAEConfig | WanVAEConfig | None
    """Our VAE's config, or (with vae_ref) the imported VAE's geometry and normalisation."""
    text: TextEncoderConfig
    vae_ref: str | None = None
    """`diffusers:URI` for an imported VAE; None when vae.safetensors holds our own VAE."""
    run: dict = field(default_factory=dict)
    """Provenance only: run name, step, stage, source URIs. Nothing reads settings from here."""
    render: RenderDefaults | None = None
    """Required with a DiT (save_package refuses one without); None in a VAE-only package."""
    lora: dict | None = None
    """{"rank", "alpha", "target_modules"} of lora.safetensors; None without adapters."""

    def to_json(self) -> str:
        return json.dumps({
            "format_version": FORMAT_VERSION,
            "dit": self.dit.to_dict() if self.dit else None,
            "vae": self.vae.to_dict() if self.vae else None,
            "vae_ref": self.vae_ref,
            "text_encoder": self.text.to_dict(),
            "run": self.run,
            "render": self.render.to_dict() if self.render else None,
            "lora": self.lora,
        }, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, uri: str) -> PackageMeta:
        try:
            d = json.loads(text)
            version = d.get("format_version")
            if version not in READ_VERSIONS:
                raise PackageError(f"{uri}: format_version {version!r}, this t2v reads "
                                   f"{', '.join(map(str, READ_VERSIONS))}")
            ref = d.get("vae_ref")
            if ref is not None:
                parse_ref(ref)  # ValueError: a malformed reference is an invalid model.json
            vae_cls = WanVAEConfig if ref is not None else VAEConfig
            run = d.get("run") or {}
            render = (_migrate_v1(run) if version == 1 else
                      RenderDefaults.from_dict(d["render"]) if d.get("render") else None)
            return cls(dit=DiTConfig.from_dict(d["dit"]) if d.get("dit") else None,
                       vae=vae_cls.from_dict(d["vae"]) if d.get("vae") else None,
                       vae_ref=d.get("vae_ref"),
                       text=TextEncoderConfig.from_dict(d["text_encoder"]),
                       run=run, render=render, lora=d.get("lora"))
        except PackageError:
            raise
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise PackageError(f"{uri}/{MODEL_JSON}: invalid: {e}") from None


def _tensors(state: dict[str, torch.Tensor],
             dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors (safetensors refuses shared or strided storage), floating-point
    ones in `dtype` when given."""
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
            .detach().contiguous().cpu() for k, v in state.items()}


def _file_digest(path) -> bytes:
    """sha256 of a local file, read in 1 MiB pieces (a 5 GB file never sits in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(2**20), b""):
            digest.update(chunk)
    return digest.digest()


def _part_digest(part_uri: str) -> bytes:
    """sha256 of one file of a package, local or S3 (downloaded to a temp file first)."""
    with storage.local_copy(part_uri) as path:
        return _file_digest(path)


def content_hash(digests: dict[str, bytes]) -> str:
    """The package's identity from the sha256 digest of each of its files."""
    h = hashlib.sha256()
    for name in (MODEL_JSON, *WEIGHT_FILES):
        if name in digests:
            h.update(name.encode() + b"\0")
            h.update(digests[name])
    return h.hexdigest()


def package_hash(uri: str) -> str:
    """`content_hash` of the package at `uri`, streamed: the weights never sit in memory."""
    digests = {}
    for name in (MODEL_JSON, *WEIGHT_FILES):
        part = storage.join(uri, name)
        if storage.exists(part):
            digests[name] = _part_digest(part)
    return content_hash(digests)


def save_package(uri: str, *, vae: CausalVideoVAE | WanVAE | None,
                 dit: VideoDiT | None = None, text: TextEncoderConfig | None = None,
                 render: RenderDefaults | None = None,
                 run: dict | None = None, vae_ref: str | None = None,
                 vae_config: WanVAEConfig | None = None,
                 lora: dict[str, torch.Tensor] | None = None,
                 lora_meta: dict | None = None,
                 dit_dtype: torch.dtype | None = None) -> str:
    """Write a package (weights first, model.json last); returns its content hash.

    The VAE is our module (weights written), a loaded WanVAE (its reference recorded), or,
    without a module, `vae_ref` + `vae_config` (what `t2v import` writes). A DiT needs its
    `render` defaults (what render falls back to). `lora` adapters need `lora_meta`
    ({"rank", "alpha", "target_modules"}). `dit_dtype` (e.g. torch.bfloat16: half the bytes)
    stores the DiT's and the adapters' floating-point weights in that dtype; `load_package`
    builds them in whatever dtype it is asked for.
    """
    if dit is not None and render is None:
        raise ValueError("a package with a DiT needs its render defaults (RenderDefaults: the "
                         "frames, height, width and fps it was trained at)")
    if isinstance(vae, WanVAE):
        vae_ref, vae_config, vae = vae.ref, vae.config, None
    if vae is None and (vae_ref is None or vae_config is None):
        raise ValueError("a package needs a VAE (module, or diffusers: reference + its config)")
    if lora and not (lora_meta and {"rank", "alpha"} <= set(lora_meta)):
        raise ValueError(f"LoRA weights need lora_meta with rank and alpha, got {lora_meta}")
    if vae_ref is not None:
        parse_ref(vae_ref)
    meta = PackageMeta(dit=dit.config if dit is not None else None,
                       vae=vae.config if vae is not None else vae_config, vae_ref=vae_ref,
                       text=text or TextEncoderConfig(), run=run or {}, render=render,
                       lora=lora_meta if lora else None)
    weights: dict[str, dict[str, torch.Tensor]] = {}
    if dit is not None:
        weights["dit.safetensors"] = _tensors(dit.state_dict(), dit_dtype)
    if vae is not None:
        weights["vae.safetensors"] = _tensors(vae.state_dict())
    if lora:
        weights["lora.safetensors"] = _tensors(lora, dit_dtype)
    digests = {}
    for name, state in weights.items():
        # A local file (no second copy of the weights as bytes), then one atomic rename or
        # multipart upload (storage.transfer_config): no partial object at the final key.
        with storage.atomic_local_file(storage.join(uri, name)) as tmp:
            save_file(state, tmp)
            digests[name] = _file_digest(tmp)
    meta_json = meta.to_json().encode()
    digests[MODEL_JSON] = hashlib.sha256(meta_json).digest()
    storage.write_bytes(storage.join(uri, MODEL_JSON), meta_json)  # last: the package exists
    return content_hash(digests)


def _read_weights(part_uri: str, what: str) -> tuple[dict[str, torch.Tensor], bytes]:
    """(tensors, sha256) of a weights file: read through a local file (memory-mapped by
    safetensors; an S3 object is downloaded to a temp file first), never as Python bytes."""
    with storage.local_copy(part_uri) as path:
        try:
            state = load_file(path)
        except Exception as e:  # SafetensorError is not exported under a stable name
            raise PackageError(f"{what}: not a safetensors file ({e})") from None
        return state, _file_digest(path)


def _build(cls: type[nn.Module], config, state: dict[str, torch.Tensor], uri: str,
           dtype: torch.dtype, device: str | torch.device) -> nn.Module:
    """Build on the meta device (no memory, no init cost), then adopt the stored tensors."""
    with torch.device("meta"):
        model = cls(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise PackageError(f"{uri}: weights do not match the config: "
                           f"{str(e).splitlines()[0]}") from None
    return model.to(device=device, dtype=dtype).eval()


@dataclass
class LoadedPackage:
    uri: str
    meta: PackageMeta
    hash: str
    vae: CausalVideoVAE | WanVAE | None
    dit: VideoDiT | None
    """With `lora`, the adapters are already merged in (unless load_package(merge_lora=False))."""
    text: TextEncoder | None
    lora: dict[str, torch.Tensor] | None


def _meta_json(uri: str) -> bytes:
    try:
        return storage.read_bytes(storage.join(uri, MODEL_JSON))
    except storage.StorageError as e:
        raise PackageError(f"{uri}: not a model package ({MODEL_JSON} missing: {e})") from None


def read_meta(uri: str) -> PackageMeta:
    return PackageMeta.from_json(_meta_json(uri).decode(), uri)


def load_package(uri: str, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, load_text: bool = True,
                 load_dit: bool = True, load_vae: bool = True,
                 merge_lora: bool = True) -> LoadedPackage:
    """Everything a package holds, built on `device`; an imported VAE comes from its reference
    (needs diffusers), unmerged LoRA adapters are merged into the DiT unless told otherwise."""
    meta_json = _meta_json(uri)  # read once: parsed here, hashed below
    meta = PackageMeta.from_json(meta_json.decode(), uri)
    digests = {MODEL_JSON: hashlib.sha256(meta_json).digest()}
    wanted = {"dit.safetensors": load_dit, "vae.safetensors": load_vae,
              "lora.safetensors": load_dit}
    states: dict[str, dict[str, torch.Tensor]] = {}
    present: set[str] = set()
    for name in WEIGHT_FILES:
        part = storage.join(uri, name)
        if not storage.exists(part):
            continue
        present.add(name)
        if wanted[name]:
            states[name], digests[name] = _read_weights(part, f"{uri}/{name}")
        else:  # hashed (the package's identity), not loaded
            digests[name] = _part_digest(part)
    if meta.dit is not None and "dit.safetensors" not in present:
        raise PackageError(f"{uri}: model.json has a DiT but dit.safetensors is missing")
    if meta.vae_ref is None and meta.vae is not None and "vae.safetensors" not in present:
        raise PackageError(f"{uri}: model.json has a VAE but vae.safetensors is missing")
    if "lora.safetensors" in present and not meta.lora:
        raise PackageError(f"{uri}: lora.safetensors without LoRA rank/alpha in model.json")
    if not load_vae:
        vae = None
    elif meta.vae_ref is not None:
        vae = _load_wan_vae(uri, meta, dtype, device)
    else:
        vae = (_build(CausalVideoVAE, meta.vae, states["vae.safetensors"], uri, dtype, device)
               if meta.vae is not None else None)
    dit = (_build(VideoDiT, meta.dit, states["dit.safetensors"], uri, dtype, device)
           if meta.dit is not None and load_dit else None)
    text = TextEncoder(meta.text).to(device) if load_text and meta.dit is not None else None
    lora = states.get("lora.safetensors")
    if lora and dit is not None and merge_lora:
        try:
            merge_into(dit, lora, lora_scale(int(meta.lora["rank"]), meta.lora.get("alpha")))
        except (ValueError, KeyError) as e:
            raise PackageError(f"{uri}: lora.safetensors does not fit the DiT: {e}") from None
    return LoadedPackage(uri=uri, meta=meta, hash=content_hash(digests), vae=vae, dit=dit,
                         text=text, lora=lora)


class DiTWeights(Mapping[str, torch.Tensor]):
    """A package's DiT weights by name, each read from the memory-mapped safetensors file only
    when asked for, with the package's LoRA adapters merged into the weights they adapt."""

    def __init__(self, path: str, lora: dict[str, torch.Tensor] | None, scale: float,
                 uri: str) -> None:
        self.file, self.uri, self.scale = safe_open(path, framework="pt"), uri, scale
        self.names = list(self.file.keys())  # noqa: SIM118 - safe_open has keys(), no __iter__
        # weight name -> the adapters (A, B) of its layer
        self.adapters: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in (lora or {}).items():
            self.adapters.setdefault(key.rsplit(".", 2)[0] + ".weight", {})[key] = value

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(name)
        t = self.file.get_tensor(name)
        if name not in self.adapters:
            return t
        try:
            return merge_lora({name: t}, self.adapters[name], self.scale)[name]
        except ValueError as e:
            raise PackageError(f"{self.uri}: lora.safetensors does not fit the DiT: {e}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


@contextlib.contextmanager
def dit_weights(uri: str) -> Iterator[DiTWeights]:
    """The DiT weights of a package (LoRA merged), one tensor in memory at a time: what a
    training run starting from it loads into a model it built itself, e.g. partitioned under
    ZeRO-3 (no module is built here: `load_package` would build a second, whole one)."""
    meta = read_meta(uri)
    part = storage.join(uri, "dit.safetensors")
    if meta.dit is None or not storage.exists(part):
        raise PackageError(f"{uri}: the package has no DiT weights")
    lora = None
    if meta.lora and storage.exists(storage.join(uri, "lora.safetensors")):
        lora = _read_weights(storage.join(uri, "lora.safetensors"), f"{uri}/lora.safetensors")[0]
    with storage.local_copy(part) as path:
        try:
            weights = DiTWeights(str(path), lora, lora_scale(int(meta.lora["rank"]),
                                 meta.lora.get("alpha")) if lora else 1.0, uri)
        except Exception as e:  # SafetensorError is not exported under a stable name
            raise PackageError(f"{uri}/dit.safetensors: not a safetensors file ({e})") from None
        yield weights


def _load_wan_vae(uri: str, meta: PackageMeta, dtype: torch.dtype,
                  device: str | torch.device) -> WanVAE:
    if not isinstance(meta.vae, WanVAEConfig):
        raise PackageError(f"{uri}: vae_ref {meta.vae_ref} without its VAE config in model.json")
    try:
        return WanVAE.load(meta.vae_ref, meta.vae, device=device, dtype=dtype)
    except (ImportError, FileNotFoundError, ValueError, OSError) as e:
        raise PackageError(f"{uri}: cannot load VAE {meta.vae_ref}: "
                           f"{str(e).splitlines()[0]}") from None
