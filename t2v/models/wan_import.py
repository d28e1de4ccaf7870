"""`t2v import --wan URI --out PKG`: a diffusers-format Wan 2.1 T2V folder -> a t2v model package.

The folder is what `WanPipeline.save_pretrained` writes (and what the published
`Wan2.1-T2V-*-Diffusers` checkpoints hold): model_index.json, transformer/, vae/, text_encoder/,
tokenizer/ (scheduler/ optional). Nothing is downloaded: the user points at files they hold, on
disk or in a bucket. The package gets
- dit.safetensors: the transformer converted to VideoDiT (t2v/models/wan.py), with Wan's
  unmasked-text convention (DiTConfig.text_mask = False) so it reproduces WanPipeline;
- vae_ref = "diffusers:URI/vae" plus the VAE's geometry and latent normalisation
  (t2v/models/wan_vae.py): the VAE stays where it is and is loaded through diffusers;
- a text-encoder reference to URI/text_encoder + URI/tokenizer (umT5), with Wan's prompt
  cleaning and 512-token length;
- render defaults: frames, height, width, the timestep shift of the folder's scheduler
  (`flow_shift`) and, when that scheduler is Wan's UniPC, sampler "unipc", which renders what
  WanPipeline does with it (t2v/diffusion/unipc.py).
The source must therefore stay where it is: the package refers to its vae/ and text_encoder/.

A folder that is incomplete or holds another model type is refused in one line naming what is
missing or what it is. Pure: no Ray; diffusers is not needed to import (only to render).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from t2v import hub, storage
from t2v.config import ImportConfig
from t2v.models.package import RenderDefaults, save_package
from t2v.models.text import TextEncoderConfig, resolve_model_dir
from t2v.models.wan import load_wan_transformer
from t2v.models.wan_vae import DIFFUSERS_PREFIX, wan_vae_config
from t2v.runtime import check_output_uri

PIPELINE_CLASS = "WanPipeline"
# model_index.json component -> the classes a Wan 2.1 T2V pipeline has there.
COMPONENTS = {
    "transformer": ("WanTransformer3DModel",),
    "vae": ("AutoencoderKLWan",),
    "text_encoder": ("UMT5EncoderModel", "T5EncoderModel"),
    "tokenizer": None,  # any tokenizer class
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model")
TEXT_MODEL_TYPES = ("umt5", "t5", "mt5")


class WanImportError(ValueError):
    """A source folder that is not a complete Wan 2.1 T2V checkpoint; the message is one line."""


def missing_files(uri: str, files: list[str]) -> list[str]:
    """What a Wan folder lacks, as relative names or patterns (empty: complete).

    `files` are the URIs under `uri` (one listing, so a bucket costs one request per 1000 keys).
    """
    root = uri.rstrip("/") + "/"
    rel = {f[len(root):] for f in files if f.startswith(root)}

    def has(pattern_dir: str, names: tuple[str, ...] = (), suffix: str | None = None) -> bool:
        inside = [r[len(pattern_dir) + 1:] for r in rel if r.startswith(pattern_dir + "/")]
        return any(r in names or (suffix is not None and r.endswith(suffix)) for r in inside)

    missing = [] if "model_index.json" in rel else ["model_index.json"]
    for folder in ("transformer", "vae", "text_encoder"):
        if not has(folder, ("config.json",)):
            missing.append(f"{folder}/config.json")
        if not has(folder, suffix=".safetensors"):  # never pickles: safetensors weights only
            missing.append(f"{folder}/*.safetensors")
    if not has("tokenizer", TOKENIZER_FILES):
        missing.append(f"tokenizer/ ({' or '.join(TOKENIZER_FILES)})")
    return missing


def check_model_index(index: dict, where: str) -> None:
    """Refuse anything but a Wan 2.1 text-to-video pipeline, naming what it is instead."""
    name = index.get("_class_name")
    if name != PIPELINE_CLASS:
        raise WanImportError(f"{where}: _class_name={name!r} is not a Wan 2.1 text-to-video "
                             f"pipeline ({PIPELINE_CLASS})")
    second = index.get("transformer_2")
    if second and any(second):
        raise WanImportError(f"{where}: has transformer_2 (Wan 2.2 two-expert model); only "
                             "Wan 2.1 T2V is supported")
    for key in ("boundary_ratio", "expand_timesteps"):
        if index.get(key):
            raise WanImportError(f"{where}: {key}={index[key]!r} (a Wan 2.2 model); only "
                                 "Wan 2.1 T2V is supported")
    for comp, classes in COMPONENTS.items():
        entry = index.get(comp)
        if not entry or not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
            raise WanImportError(f"{where}: no {comp} component")
        if classes is not None and entry[1] not in classes:
            raise WanImportError(f"{where}: {comp} is {entry[1]}, expected {' or '.join(classes)}")


def _absolute(uri: str) -> str:
    """References in model.json must not depend on the cwd of whoever reads the package, nor,
    for a Hub id, on which commit its branch points at when read (pinned to the one read now)."""
    if hub.is_hub(uri):
        return hub.pin(uri)
    return uri if storage.is_s3(uri) else str(storage.local_path(uri).resolve())


# The UniPCMultistepScheduler that `sampler=unipc` reproduces (t2v/diffusion/unipc.py): Wan's
# published configuration, as {setting: (diffusers' default, the value it must have)}.
UNIPC_SETTINGS: dict[str, tuple[object, object]] = {
    "prediction_type": ("epsilon", "flow_prediction"), "use_flow_sigmas": (False, True),
    "predict_x0": (True, True), "solver_order": (2, 2), "solver_type": ("bh2", "bh2"),
    "lower_order_final": (True, True), "final_sigmas_type": ("zero", "zero"),
    "num_train_timesteps": (1000, 1000), "thresholding": (False, False),
    "disable_corrector": ([], []), "solver_p": (None, None), "shift_terminal": (None, None),
    "use_dynamic_shifting": (False, False), "use_karras_sigmas": (False, False),
    "use_exponential_sigmas": (False, False), "use_beta_sigmas": (False, False),
}


def read_scheduler(uri: str, files: list[str]) -> dict | None:
    """scheduler/scheduler_config.json of the folder, or None when it has none."""
    cfg_uri = storage.join(uri, "scheduler", "scheduler_config.json")
    return read_json_object(cfg_uri) if cfg_uri in files else None


def scheduler_shift(cfg: dict | None) -> float | None:
    """The timestep shift of the folder's scheduler (UniPC `flow_shift` or FlowMatch `shift`)."""
    if cfg is None or cfg.get("use_dynamic_shifting"):
        return None  # resolution-dependent: no single value to record
    value = cfg.get("flow_shift", cfg.get("shift"))
    return float(value) if value else None


def scheduler_sampler(cfg: dict | None) -> str | None:
    """The render sampler for the folder's scheduler: "unipc" for Wan's UniPC (flow prediction,
    order 2, bh2, ...), which it reproduces exactly; None (the renderer's default) otherwise."""
    if cfg is None or cfg.get("_class_name") != "UniPCMultistepScheduler":
        return None
    same = all(cfg.get(k, default) == want for k, (default, want) in UNIPC_SETTINGS.items())
    return "unipc" if same else None


def inspect_wan(uri: str) -> tuple[dict, list[str]]:
    """(model_index, file list) of a complete Wan 2.1 T2V folder, or WanImportError (one line)."""
    try:
        files = storage.list_prefix(uri)
    except storage.StorageError as e:
        raise WanImportError(f"{uri}: cannot list the folder: {e}") from None
    if not files:
        raise WanImportError(f"{uri}: empty or missing folder (expected a diffusers-format Wan "
                             "2.1 T2V folder: model_index.json, transformer/, vae/, "
                             "text_encoder/, tokenizer/)")
    missing = missing_files(uri, files)
    if missing:
        raise WanImportError(f"{uri}: not a complete Wan 2.1 T2V folder: missing "
                             f"{', '.join(missing)}")
    index = read_json_object(storage.join(uri, "model_index.json"))
    check_model_index(index, f"{uri}/model_index.json")
    text_cfg = read_json_object(storage.join(uri, "text_encoder", "config.json"))
    if text_cfg.get("model_type") not in TEXT_MODEL_TYPES:
        raise WanImportError(f"{uri}/text_encoder/config.json: model_type="
                             f"{text_cfg.get('model_type')!r}, expected umt5 or t5")
    return index, files


def read_json_object(uri: str, error: type[ValueError] = WanImportError) -> dict:
    """A folder's JSON config, or `error` in one line (invalid JSON, not an object)."""
    try:
        data = json.loads(storage.read_text(uri))
    except json.JSONDecodeError as e:
        raise error(f"{uri}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{uri}: expected a JSON object")
    return data


def import_wan(cfg: ImportConfig) -> dict:
    """Convert `cfg.wan` into a package at `cfg.out`; returns a summary (also what the CLI prints).

    Checks everything cheap (file list, model_index, configs) before reading any weights.
    """
    t0 = time.time()
    uri = _absolute(cfg.wan.rstrip("/"))
    _index, files = inspect_wan(uri)
    try:
        vae_cfg = wan_vae_config(read_json_object(storage.join(uri, "vae", "config.json")))
    except ValueError as e:
        raise WanImportError(f"{uri}: {e}") from None
    scheduler = read_scheduler(uri, files)
    shift = cfg.shift if cfg.shift is not None else scheduler_shift(scheduler)
    sampler = scheduler_sampler(scheduler)
    # A bucket's transformer/ is copied to the node's cache once; a local one is read in place.
    folder = resolve_model_dir(storage.join(uri, "transformer"))
    try:
        dit = load_wan_transformer(Path(folder))
    except ValueError as e:
        raise WanImportError(f"{uri}/transformer: {str(e).splitlines()[0]}") from None
    # WanPipeline gives the transformer zero-padded umT5 embeddings and no mask: the padded
    # positions are attended to, and the weights were trained that way.
    dit.config = replace(dit.config, text_mask=False)
    if dit.config.in_channels != vae_cfg.latent_channels:
        raise WanImportError(f"{uri}: transformer in_channels={dit.config.in_channels} != VAE "
                             f"z_dim={vae_cfg.latent_channels}")
    text = TextEncoderConfig(ref=storage.join(uri, "text_encoder"),
                             tokenizer=storage.join(uri, "tokenizer"),
                             max_length=cfg.text_max_length, truncate=True, clean=True)
    run = {"stage": "import", "imported_from": uri, "source_format": f"diffusers {PIPELINE_CLASS}"}
    render = RenderDefaults(frames=cfg.frames, height=cfg.height, width=cfg.width, fps=cfg.fps,
                            shift=shift or 1.0, steps=cfg.steps, cfg=cfg.cfg, sampler=sampler)
    vae_ref = DIFFUSERS_PREFIX + storage.join(uri, "vae")
    digest = save_package(cfg.out, vae=None, vae_ref=vae_ref, vae_config=vae_cfg, dit=dit,
                          text=text, render=render, run=run)
    params = dit.num_params()
    print(f"[import] {uri} -> {cfg.out}: VideoDiT {params / 1e6:.1f}M params "
          f"(dim {dit.config.dim}, depth {dit.config.depth}), VAE {vae_ref}, text "
          f"{text.ref} (sha256 {digest[:12]}, {time.time() - t0:.1f} s)", flush=True)
    return {"package": cfg.out, "sha256": digest, "dit_params": params, "vae_ref": vae_ref,
            "text_encoder": text.ref, "shift": shift, "sampler": sampler,
            "seconds": round(time.time() - t0, 2)}


def run_import_command(cfg: ImportConfig) -> dict:
    """`t2v import` / jobs/import.py: one-line errors for missing settings, then `import_wan`."""
    for name in ("wan", "out"):
        if not getattr(cfg, name):
            raise ValueError(f"import needs {name}=URI (--{name})")
    repo = hub.bare_repo_id(cfg.wan)  # `--wan Wan-AI/Wan2.1-T2V-1.3B-Diffusers`
    if repo is not None:
        cfg = cfg.model_copy(update={"wan": repo})
    check_output_uri(cfg.out)
    return import_wan(cfg)
