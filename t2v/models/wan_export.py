"""`t2v export --diffusers PKG OUT`: a Wan model package -> a folder `WanPipeline` loads.

The inverse of `t2v import --wan` (t2v/models/wan_import.py), for packages whose networks are
Wan 2.1's: imported ones and those fine-tuned from them (full or LoRA). OUT gets
- transformer/: config.json of a `WanTransformer3DModel` and the DiT weights under diffusers
  names (t2v/models/wan_keys.py), in the dtype the package stores them in (bf16 stays bf16),
  sharded with an index past `MAX_SHARD_BYTES`;
- vae/: a copy of the folder the package's `diffusers:` VAE reference points at;
- text_encoder/ and tokenizer/: copies of the package's umT5 (or T5) folders;
- scheduler/: the package's sampler as a diffusers scheduler, with the package's shift
  (`scheduler_config`: UniPC flow config as Wan-AI ships it for unipc; a package naming no
  sampler gets the one t2v renders it with, Euler);
- pytorch_lora_weights.safetensors, for a package with LoRA adapters: transformer/ holds the
  base weights and this file the adapters under diffusers/peft names, alpha / rank folded in, so
  that `pipe.load_lora_weights(OUT)` renders what the package renders (adapter at scale 1);
- t2v_export.json: where it came from (package URI and hash) and the `WanPipeline` call
  arguments that reproduce the package's render defaults (`max_sequence_length` matters: Wan
  attends to the zero padding, so the text length is part of the model);
- model_index.json, written last: a folder without it is incomplete.

A package that diffusers cannot reproduce is refused in one line saying why and what can be
exported: t2v's own DiT convention (masked text padding), our CausalVideoVAE, a text encoder
that is not T5/umT5. OUT must be empty unless `overwrite` (then its files are deleted first).
Pure: no Ray, no diffusers import; local paths or s3:// URIs through t2v.storage.
"""

from __future__ import annotations

import json
import math
import time

from safetensors import safe_open
from safetensors.torch import save_file

from t2v import storage
from t2v.config import ExportConfig
from t2v.diffusion.sampling import DEFAULT_SAMPLER
from t2v.models.lora import lora_scale
from t2v.models.package import PackageMeta, RenderDefaults, package_hash, read_meta
from t2v.models.wan_import import (
    PIPELINE_CLASS,
    TEXT_MODEL_TYPES,
    TOKENIZER_FILES,
    read_json_object,
)
from t2v.models.wan_keys import (
    TRANSFORMER_CLASS,
    lora_to_diffusers,
    wan_tensors,
    wan_transformer_config,
)
from t2v.models.wan_vae import VAE_CLASS, parse_ref, wan_vae_config
from t2v.runtime import check_output_uri

DIFFUSERS_VERSION = "0.33.0"
"""Recorded in the configs: the first diffusers with Wan 2.1 (what the published folders say)."""
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
LORA_FILE = "pytorch_lora_weights.safetensors"
"""The name `load_lora_weights(OUT)` looks for first in a folder."""
EXPORT_INFO = "t2v_export.json"
MAX_SHARD_BYTES = 5 * 2**30
"""transformer/ shards: a shard is built in memory before it is written (Wan 14B: 57 GB fp32)."""
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
                "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".index.json")
WHAT_EXPORTS = ("only Wan 2.1 packages export to diffusers: imported with `t2v import --wan` "
                "and optionally fine-tuned")


class WanExportError(ValueError):
    """A package (or OUT) that cannot be exported; the message is one line."""


# ----------------------------------------------------------------------------- what is written


def scheduler_config(render: RenderDefaults) -> dict:
    """scheduler/scheduler_config.json for the sampler the package renders with, at its shift.

    unipc: `UniPCMultistepScheduler` as Wan-AI's Diffusers folders configure it (flow sigmas,
    flow_prediction; `t2v import` records unipc for such a folder); euler, and a package that
    names no sampler (t2v renders it with DEFAULT_SAMPLER): `FlowMatchEulerDiscreteScheduler(shift)`; heun:
    `FlowMatchHeunDiscreteScheduler(shift)`; dpm_solver_2m: DPM-Solver++ 2M on flow sigmas.
    """
    flow = {"prediction_type": "flow_prediction", "use_flow_sigmas": True,
            "flow_shift": render.shift}
    # Wan's settings spelled out (today's diffusers defaults), so no later default can move them.
    unipc = {**flow, "solver_order": 2, "solver_type": "bh2", "predict_x0": True,
             "lower_order_final": True, "final_sigmas_type": "zero"}
    by_sampler = {
        "unipc": ("UniPCMultistepScheduler", unipc),
        "euler": ("FlowMatchEulerDiscreteScheduler", {"shift": render.shift}),
        "heun": ("FlowMatchHeunDiscreteScheduler", {"shift": render.shift}),
        "dpm_solver_2m": ("DPMSolverMultistepScheduler",
                          {**flow, "solver_order": 2, "algorithm_type": "dpmsolver++"}),
    }
    sampler = render.sampler or DEFAULT_SAMPLER  # as t2v renders it
    if sampler not in by_sampler:
        raise WanExportError(f"render.sampler={sampler!r} has no diffusers scheduler here; "
                             f"known: {', '.join(by_sampler)}")
    name, settings = by_sampler[sampler]
    return {"_class_name": name, "_diffusers_version": DIFFUSERS_VERSION,
            "num_train_timesteps": 1000, **settings}


def pipeline_kwargs(meta: PackageMeta) -> dict:
    """`WanPipeline.__call__` arguments that render like the package's defaults."""
    r = meta.render
    kwargs = {"num_frames": r.frames, "height": r.height, "width": r.width,
              "num_inference_steps": r.steps, "guidance_scale": r.cfg,
              "max_sequence_length": meta.text.max_length}
    return {k: v for k, v in kwargs.items() if v is not None}


# ----------------------------------------------------------------------------- checks


def check_exportable(uri: str, meta: PackageMeta) -> tuple[dict, dict]:
    """(transformer config, text encoder config.json) of an exportable package, else
    WanExportError naming what diffusers cannot reproduce."""
    if meta.dit is None or meta.render is None:
        raise WanExportError(f"{uri}: a VAE-only package (no DiT): nothing to export; "
                             f"{WHAT_EXPORTS}")
    if meta.dit.text_mask:
        raise WanExportError(f"{uri}: the DiT masks padded text tokens (text_mask=True, t2v's own "
                             "DiT convention) and WanPipeline attends to them, so it would "
                             f"render something else; {WHAT_EXPORTS}")
    try:
        transformer = wan_transformer_config(meta.dit)
    except ValueError as e:
        raise WanExportError(f"{uri}: the DiT is not a Wan transformer: {e}") from None
    if meta.vae_ref is None:
        raise WanExportError(f"{uri}: the VAE is t2v's own CausalVideoVAE, which diffusers "
                             f"cannot load (it takes {VAE_CLASS}); {WHAT_EXPORTS}")
    if meta.text.ref.startswith("builtin:"):
        raise WanExportError(f"{uri}: text encoder {meta.text.ref} is not a T5/umT5 folder "
                             f"(WanPipeline encodes with umT5); {WHAT_EXPORTS}")
    text = _read_json(storage.join(meta.text.ref, "config.json"))
    if text.get("model_type") not in TEXT_MODEL_TYPES:
        raise WanExportError(f"{meta.text.ref}/config.json: model_type="
                             f"{text.get('model_type')!r}, WanPipeline needs umt5 or t5")
    if meta.lora and meta.lora.get("rank") is None:
        raise WanExportError(f"{uri}/model.json: LoRA without a rank")
    return transformer, text


def _read_json(uri: str) -> dict:
    try:
        return read_json_object(uri, WanExportError)
    except storage.StorageError as e:
        raise WanExportError(f"{uri}: cannot read it ({str(e).splitlines()[0]})") from None


def _absolute(uri: str) -> str:
    return uri.rstrip("/") if storage.is_s3(uri) else str(storage.local_path(uri).resolve())


def _check_out(out: str, sources: list[str], overwrite: bool) -> list[str]:
    """The files already under OUT (to delete when overwriting); refuses an OUT that overlaps a
    source (overwriting would delete what is being exported) or is not empty."""
    target = _absolute(out)
    for src in sources:
        a, b = sorted((target, _absolute(src)), key=len)
        if b == a or b.startswith(a + "/"):
            raise WanExportError(f"out={out} overlaps {src}, which the export reads: choose "
                                 "another location")
    try:
        present = storage.list_prefix(out)
    except storage.StorageError as e:
        raise WanExportError(f"out={out}: cannot list it ({e})") from None
    if present and not overwrite:
        raise WanExportError(f"out={out} is not empty ({len(present)} files, e.g. "
                             f"{present[0]}): choose an empty location or set overwrite=true "
                             "(--overwrite)")
    return present


# ----------------------------------------------------------------------------- writing


def _copy_folder(src: str, dst: str, skip_weights: bool = False) -> int:
    """Copy every file under `src` to `dst` (same relative names), one file at a time through a
    local copy (S3 is downloaded then uploaded multipart); returns the files copied."""
    root = src.rstrip("/") + "/"
    files = [f for f in storage.list_prefix(src)
             if not (skip_weights and f.endswith(_WEIGHT_SUFFIXES))]
    if not files:
        raise WanExportError(f"{src}: empty or missing folder")
    for f in files:
        with storage.local_copy(f) as path:
            storage.upload_file(path, storage.join(dst, f[len(root):]))
    return len(files)


def _shard_plan(f, max_bytes: int) -> list[list[str]]:
    """The source keys of each shard, in file order; a shard closes when it would pass
    `max_bytes` (a tensor larger than that is a shard of its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for key in f.keys():  # noqa: SIM118 - safe_open has keys(), no __iter__
        sl = f.get_slice(key)
        n = math.prod(sl.get_shape()) * _DTYPE_BYTES[sl.get_dtype()]
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += n
    return shards


def write_transformer(dit_uri: str, out: str, config: dict,
                      max_shard_bytes: int = MAX_SHARD_BYTES) -> dict:
    """transformer/ from a package's dit.safetensors: renamed, split where fused, dtype kept,
    read through a memory map and written one shard at a time. Returns params and dtypes."""
    folder = storage.join(out, "transformer")
    params, dtypes, weight_map, total = 0, set(), {}, 0
    with storage.local_copy(dit_uri) as path, safe_open(str(path), framework="pt") as f:
        plan = _shard_plan(f, max_shard_bytes)
        for i, keys in enumerate(plan):
            name = WEIGHTS_NAME if len(plan) == 1 else (
                f"diffusion_pytorch_model-{i + 1:05d}-of-{len(plan):05d}.safetensors")
            shard = dict(kv for key in keys for kv in wan_tensors(key, f.get_tensor(key)))
            with storage.atomic_local_file(storage.join(folder, name)) as tmp:
                save_file(shard, tmp, metadata={"format": "pt"})
            for k, t in shard.items():
                weight_map[k] = name
                params += t.numel()
                total += t.numel() * t.element_size()
                dtypes.add(str(t.dtype).removeprefix("torch."))
    if len(plan) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        storage.write_text(storage.join(folder, f"{WEIGHTS_NAME}.index.json"),
                           json.dumps(index, indent=1))
    storage.write_text(storage.join(folder, "config.json"),
                       json.dumps({**config, "_diffusers_version": DIFFUSERS_VERSION}, indent=1))
    return {"params": params, "dtype": ",".join(sorted(dtypes)), "shards": len(plan)}


def _tokenizer_class(tokenizer_dir: str) -> str:
    """The transformers class model_index.json names for tokenizer/ (its own record first)."""
    files = {f.rsplit("/", 1)[-1] for f in storage.list_prefix(tokenizer_dir)}
    if "tokenizer_config.json" in files:
        cls = _read_json(storage.join(tokenizer_dir, "tokenizer_config.json")).get(
            "tokenizer_class")
        if cls:
            return str(cls)
    if "tokenizer.json" in files:
        return "PreTrainedTokenizerFast"
    if "spiece.model" in files:
        return "T5Tokenizer"
    raise WanExportError(f"{tokenizer_dir}: no tokenizer here ({' or '.join(TOKENIZER_FILES)})")


def _write_lora(uri: str, meta: PackageMeta, out: str) -> int:
    """pytorch_lora_weights.safetensors from the package's lora.safetensors; returns tensors."""
    with storage.local_copy(storage.join(uri, "lora.safetensors")) as path, safe_open(
            str(path), framework="pt") as f:
        lora = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - no __iter__
    try:
        state = lora_to_diffusers(lora, lora_scale(int(meta.lora["rank"]),
                                                   meta.lora.get("alpha")))
    except ValueError as e:
        raise WanExportError(f"{uri}/lora.safetensors: {e}") from None
    with storage.atomic_local_file(storage.join(out, LORA_FILE)) as tmp:
        save_file(state, tmp, metadata={"format": "pt"})
    return len(state)


def export_diffusers(package: str, out: str, overwrite: bool = False,
                     max_shard_bytes: int = MAX_SHARD_BYTES) -> dict:
    """Write the diffusers folder of `package` at `out`; returns a JSON-able summary.

    Everything cheap is checked (model.json, the referenced configs, OUT) before any weights are
    read or anything is written.
    """
    t0 = time.time()
    meta = read_meta(package)
    transformer, text = check_exportable(package, meta)
    vae_src = parse_ref(meta.vae_ref)
    try:
        wan_vae_config(_read_json(storage.join(vae_src, "config.json")))
    except ValueError as e:
        raise WanExportError(f"{vae_src}: {str(e).splitlines()[0]}") from None
    scheduler = scheduler_config(meta.render)
    tokenizer_src = meta.text.tokenizer or meta.text.ref
    tokenizer_cls = _tokenizer_class(tokenizer_src)
    has_lora = bool(meta.lora) and storage.exists(storage.join(package, "lora.safetensors"))
    present = _check_out(out, [package, vae_src, meta.text.ref, tokenizer_src], overwrite)
    for f in present:  # overwrite: nothing of an earlier export may survive (shards, LoRA)
        storage.delete(f)

    written = write_transformer(storage.join(package, "dit.safetensors"), out, transformer,
                                max_shard_bytes)
    _copy_folder(vae_src, storage.join(out, "vae"))
    _copy_folder(meta.text.ref, storage.join(out, "text_encoder"))
    _copy_folder(tokenizer_src, storage.join(out, "tokenizer"),
                 skip_weights=tokenizer_src == meta.text.ref)
    storage.write_text(storage.join(out, "scheduler", "scheduler_config.json"),
                       json.dumps(scheduler, indent=1))
    lora_tensors = _write_lora(package, meta, out) if has_lora else 0
    summary = {
        "package": package, "out": out, "sha256": package_hash(package),
        "transformer_params": written["params"], "dtype": written["dtype"],
        "shards": written["shards"], "scheduler": scheduler["_class_name"],
        "shift": meta.render.shift, "lora": storage.join(out, LORA_FILE) if has_lora else None,
        "lora_tensors": lora_tensors, "pipeline_kwargs": pipeline_kwargs(meta),
    }
    storage.write_text(storage.join(out, EXPORT_INFO), json.dumps(summary, indent=1))
    text_cls = "UMT5EncoderModel" if text["model_type"] == "umt5" else "T5EncoderModel"
    index = {"_class_name": PIPELINE_CLASS, "_diffusers_version": DIFFUSERS_VERSION,
             "scheduler": ["diffusers", scheduler["_class_name"]],
             "text_encoder": ["transformers", text_cls],
             "tokenizer": ["transformers", tokenizer_cls],
             "transformer": ["diffusers", TRANSFORMER_CLASS], "vae": ["diffusers", VAE_CLASS]}
    storage.write_text(storage.join(out, "model_index.json"), json.dumps(index, indent=1))
    summary["seconds"] = round(time.time() - t0, 2)
    print(f"[export] {package} -> {out}: {TRANSFORMER_CLASS} {written['params'] / 1e6:.1f}M "
          f"params ({written['dtype']}), {scheduler['_class_name']} shift {meta.render.shift}"
          f"{', LoRA ' + LORA_FILE if has_lora else ''} ({summary['seconds']:.1f} s)", flush=True)
    return summary


def run_export_command(cfg: ExportConfig) -> dict:
    """`t2v export --diffusers PKG OUT`: one-line errors for missing settings, then the export."""
    for name in ("package", "out"):
        if not getattr(cfg, name):
            raise ValueError(f"export needs {name}=URI (t2v export --diffusers PKG OUT)")
    if cfg.format != "diffusers":
        raise ValueError(f"format={cfg.format!r}: only diffusers is supported")
    check_output_uri(cfg.out)
    return export_diffusers(cfg.package, cfg.out, overwrite=cfg.overwrite)
