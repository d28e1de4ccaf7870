"""`t2v export --diffusers`: a tiny imported Wan package, fine-tuned on 2 Ray Train workers (full
and LoRA), exported -> `WanPipeline.from_pretrained` (+ `load_lora_weights`) renders the frames
our renderer does for the same noise, steps and guidance; re-import gives the same DiT weights;
what diffusers cannot reproduce is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

diffusers = pytest.importorskip("diffusers")

from t2v import storage  # noqa: E402
from t2v.config import ExportConfig, TrainConfig  # noqa: E402
from t2v.diffusion.sampling import SAMPLERS, get_noise  # noqa: E402
from t2v.models.dit import VideoDiT  # noqa: E402
from t2v.models.lora import add_lora, lora_scale, lora_state_dict  # noqa: E402
from t2v.models.package import (  # noqa: E402
    RenderDefaults,
    load_package,
    read_meta,
    save_package,
)
from t2v.models.text import TextEncoderConfig  # noqa: E402
from t2v.models.vae import CausalVideoVAE, vae_config  # noqa: E402
from t2v.models.wan_export import (  # noqa: E402
    LORA_FILE,
    WanExportError,
    export_diffusers,
    run_export_command,
    scheduler_config,
)
from t2v.models.wan_import import run_import_command  # noqa: E402
from t2v.models.wan_keys import lora_to_diffusers  # noqa: E402
from t2v.render.model import RenderModel, render_batch  # noqa: E402
from t2v.render.rows import Sample  # noqa: E402
from t2v.train.trainer import run_train  # noqa: E402
from tests.s3_fixtures import copy_tree  # noqa: E402
from tests.test_wan_import import import_config  # noqa: E402

RANK, ALPHA = 4, 8.0  # scale 2: a LoRA export that ignored alpha would not match
PROMPTS = ["a red  circle moves left", "the blue square on black background"]
SEEDS = [3, 4]
STEPS, CFG, FRAMES, SIZE = 4, 5.0, 5, 32
LATENT_ATOL = 1e-5
PIXEL_ATOL = 0.5 + 1e-3  # ours are rounded to uint8, WanPipeline's "np" frames are not


class MatchedScheduler(diffusers.FlowMatchEulerDiscreteScheduler):
    """FlowMatchEuler on t2v's Euler schedule shift(linspace(1, 0, steps + 1)): given the
    unshifted sigmas it shifts them once and appends 0, as `get_schedule` (the stock
    `set_timesteps` ends at shift(1/1000) shifted twice)."""

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, **_: object):
        sigmas = np.linspace(1.0, 0.0, num_inference_steps + 1)[:-1].tolist()
        super().set_timesteps(sigmas=sigmas, device=device)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def full_package(ray_local, train_raw, wan_package, tmp_path_factory) -> str:
    """A full fine-tune: 2 steps on 2 workers from RAW shards encoded in the workers (imported
    VAE + umT5)."""
    cfg = TrainConfig.model_validate(dict(
        stage="dit", name="full", out=str(tmp_path_factory.mktemp("runs")), init_from=wan_package,
        vae=wan_package, steps=2, batch_size=2, num_workers=2, cpus_per_worker=0.5, zero_stage=2,
        log_every=1, ckpt_every=2, val_every=2, val_samples=0, max_failures=0,
        optim={"lr": 1e-2}, data={"shards": train_raw, "encode_on_the_fly": True,
                                  "text_max_length": 16, "frames": 5, "size": 16}))
    result = run_train(cfg)
    assert result["step"] == 2
    return str(result["package"])


@pytest.fixture(scope="module")
def lora_package(wan_lora_run) -> str:
    """The session's LoRA fine-tune (conftest `wan_lora_run`: rank 4, alpha 8, every linear)."""
    return wan_lora_run[1]


@pytest.fixture(scope="module")
def full_export(full_package: str, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "full"
    run_export_command(ExportConfig(package=full_package, out=str(out)))
    return out


def _ours(package: str, sampler: str = "euler") -> tuple[torch.Tensor, list[np.ndarray]]:
    model, _ = RenderModel.load(package, device=torch.device("cpu"))
    samples = [Sample(id=f"s{i}", prompt=p, seed=s, steps=STEPS, cfg=CFG, frames=FRAMES,
                      height=SIZE, width=SIZE)
               for i, (p, s) in enumerate(zip(PROMPTS, SEEDS, strict=True))]
    return render_batch(model, samples, sampler, read_meta(package).render.shift)


def _pipeline(pipe, out: Path) -> tuple[torch.Tensor, np.ndarray]:
    """WanPipeline's latents and frames for our prompts, noise, steps, guidance and text length
    (t2v_export.json says which)."""
    info = json.loads((out / "t2v_export.json").read_text())
    noise = get_noise((4, 2, SIZE // 8, SIZE // 8), SEEDS)  # (B, C, T', H', W'), as render's
    kwargs = dict(prompt=PROMPTS, negative_prompt=["", ""], height=SIZE, width=SIZE,
                  num_frames=FRAMES, num_inference_steps=STEPS, guidance_scale=CFG,
                  latents=noise, max_sequence_length=info["pipeline_kwargs"]["max_sequence_length"])
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        z = pipe(**kwargs, output_type="latent").frames  # (B, C, T', H', W')
        frames = pipe(**kwargs, output_type="np").frames  # (B, T, H, W, 3) in [0, 1]
    return z, frames


def _assert_same(ours: tuple[torch.Tensor, list[np.ndarray]],
                 ref: tuple[torch.Tensor, np.ndarray]) -> None:
    (z, videos), (ref_z, ref_frames) = ours, ref
    assert ref_z.abs().max() > 1.0  # non-trivial
    torch.testing.assert_close(z, ref_z, rtol=0, atol=LATENT_ATOL)
    for video, frames in zip(videos, ref_frames, strict=True):
        assert video.shape == frames.shape == (FRAMES, SIZE, SIZE, 3)
        assert np.abs(video.astype(np.float64) - frames * 255.0).max() <= PIXEL_ATOL


def _matched(pipe, out: Path):
    """The exported scheduler's shift on the Euler schedule our renderer reproduces."""
    cfg = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    pipe.scheduler = MatchedScheduler(shift=cfg.get("flow_shift") or cfg["shift"])
    return pipe


# ----------------------------------------------------------------------------- round trips


def test_full_finetune_export_renders_like_wan_pipeline(full_package: str, full_export: Path,
                                                        wan_package: str, wan_folder: Path) -> None:
    base = load_file(Path(wan_package) / "dit.safetensors")
    tuned = load_file(Path(full_package) / "dit.safetensors")
    moved = [k for k in base if not torch.equal(base[k], tuned[k])]
    assert len(moved) > len(base) // 2  # the fine-tune changed the weights, not the adapters
    assert not (Path(full_package) / "lora.safetensors").exists()

    pipe = diffusers.WanPipeline.from_pretrained(full_export)
    assert read_meta(full_package).render.sampler == "unipc"  # inherited from the import
    assert type(pipe.scheduler).__name__ == "UniPCMultistepScheduler"
    assert pipe.scheduler.config.flow_shift == read_meta(full_package).render.shift == 3.0
    ref = _pipeline(_matched(pipe, full_export), full_export)
    _assert_same(_ours(full_package), ref)
    # ... and not the base model's frames
    base_z, _ = _pipeline(_matched(diffusers.WanPipeline.from_pretrained(wan_folder),
                                   full_export), full_export)
    assert (base_z - ref[0]).abs().max() > 1e-2


@pytest.mark.skipif("unipc" not in SAMPLERS, reason="t2v has no unipc sampler yet")
def test_exported_unipc_scheduler_renders_like_our_unipc(full_package: str,
                                                         full_export: Path) -> None:
    """The folder as exported, scheduler untouched, == our render with sampler unipc."""
    pipe = diffusers.WanPipeline.from_pretrained(full_export)
    _assert_same(_ours(full_package, "unipc"), _pipeline(pipe, full_export))


def test_lora_export_loads_with_load_lora_weights(lora_package: str, wan_folder: Path,
                                                  tmp_path: Path) -> None:
    """transformer/ is the base, pytorch_lora_weights.safetensors the adapters (alpha folded):
    `load_lora_weights(OUT)` renders what our package (adapters merged at scale 1) renders."""
    meta = read_meta(lora_package)
    assert meta.lora["rank"] == RANK and meta.lora["alpha"] == ALPHA
    out = tmp_path / "lora"
    summary = run_export_command(ExportConfig(package=lora_package, out=str(out)))
    assert summary["lora"] == str(out / LORA_FILE)
    lora = load_file(out / LORA_FILE)
    # our fused qkv -> to_q/to_k/to_v, cross kv -> to_k/to_v: per block 3 + out + q + 2 + out
    # + 2 ffn modules, A and B each
    assert len(lora) == 2 * 10 * 2 and "transformer.blocks.1.attn1.to_v.lora_B.weight" in lora
    assert all(lora[k].abs().max() > 0 for k in lora if "lora_B" in k)  # trained, not zero

    pipe = diffusers.WanPipeline.from_pretrained(out)
    plain_z, _ = _pipeline(_matched(pipe, out), out)
    base_z, _ = _pipeline(_matched(diffusers.WanPipeline.from_pretrained(wan_folder), out), out)
    torch.testing.assert_close(plain_z, base_z, rtol=0, atol=0)  # transformer/ is the base
    pipe.load_lora_weights(out)
    ref = _pipeline(pipe, out)
    assert (ref[0] - plain_z).abs().max() > 1e-2  # the adapters change the frames
    _assert_same(_ours(lora_package), ref)  # peft's base(x) + B(A(x)) == our merged W x


def test_reimport_gives_identical_dit_weights(full_package: str, wan_package: str, s3_bucket: str,
                                              tmp_path: Path) -> None:
    """export -> `t2v import --wan` -> the same DiT tensors: bucket to bucket with sharded
    fp32 weights, and bf16 kept bf16."""
    package, out = copy_tree(full_package, f"{s3_bucket}/pkg"), f"{s3_bucket}/sharded"
    summary = export_diffusers(package, out, max_shard_bytes=40_000)
    assert summary["shards"] > 1 and summary["dtype"] == "float32"
    assert storage.exists(f"{out}/transformer/diffusion_pytorch_model.safetensors.index.json")
    assert storage.exists(f"{out}/model_index.json") and storage.exists(f"{out}/vae/config.json")
    with pytest.raises(WanExportError, match="is not empty"):
        export_diffusers(package, out)
    back = tmp_path / "back"
    result = run_import_command(import_config(out, back))
    assert result["shift"] == read_meta(full_package).render.shift
    want = load_file(Path(full_package) / "dit.safetensors")
    got = load_file(back / "dit.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)

    meta, pkg = read_meta(wan_package), load_package(wan_package, load_text=False, load_vae=False)
    half = str(tmp_path / "bf16")
    save_package(half, vae=None, vae_ref=meta.vae_ref, vae_config=meta.vae, dit=pkg.dit,
                 text=meta.text, render=meta.render, dit_dtype=torch.bfloat16)
    assert export_diffusers(half, str(tmp_path / "bf16-out"))["dtype"] == "bfloat16"
    run_import_command(import_config(tmp_path / "bf16-out", tmp_path / "bf16-back"))
    want = load_file(Path(half) / "dit.safetensors")
    got = load_file(tmp_path / "bf16-back" / "dit.safetensors")
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


# ----------------------------------------------------------------------------- units


def test_lora_on_every_linear_matches_diffusers_adapter(wan_package: str, wan_folder: Path) -> None:
    """Adapters on every nn.Linear of the DiT (embedders, time projection, head too) land on
    the diffusers module of the same shape and give the same transformer output."""
    dit = load_package(wan_package, load_text=False, load_vae=False, dtype=torch.float64).dit
    targets = [n for n, m in dit.named_modules() if isinstance(m, torch.nn.Linear)]
    model: VideoDiT = add_lora(dit, RANK, ALPHA, targets=targets)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    state = lora_to_diffusers(lora_state_dict(model), lora_scale(RANK, ALPHA))
    ref = diffusers.WanTransformer3DModel.from_pretrained(wan_folder / "transformer").double()
    modules = dict(ref.named_modules())
    for key, t in state.items():
        layer = modules[key.removeprefix("transformer.").rsplit(".", 2)[0]]
        assert isinstance(layer, torch.nn.Linear), key
        assert t.shape[1 if "lora_A" in key else 0] == (
            layer.in_features if "lora_A" in key else layer.out_features), key
    ref.load_lora_adapter(state, prefix="transformer")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 2, 4, 4, generator=g, dtype=torch.float64)  # (B, C, T', H', W')
    t = torch.tensor([0.3, 0.8], dtype=torch.float64)
    text = torch.randn(2, 6, 32, generator=g, dtype=torch.float64)  # (B, L, text_dim)
    with torch.no_grad():
        ours = model.eval()(x, t, text)
        theirs = ref(x, timestep=t * 1000, encoder_hidden_states=text, return_dict=False)[0]
        plain = diffusers.WanTransformer3DModel.from_pretrained(wan_folder / "transformer")
        without = plain.double()(x, timestep=t * 1000, encoder_hidden_states=text,
                                 return_dict=False)[0]
    # float64 both, but diffusers embeds the timestep in float32: ~2e-7 without adapters too
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-6)
    assert (without - ours).abs().max() > 1e-3  # the adapters do something


@pytest.mark.parametrize("sampler,cls,shift_key", [
    (None, "FlowMatchEulerDiscreteScheduler", "shift"),  # what t2v renders it with
    ("unipc", "UniPCMultistepScheduler", "flow_shift"),
    ("euler", "FlowMatchEulerDiscreteScheduler", "shift"),
    ("heun", "FlowMatchHeunDiscreteScheduler", "shift"),
    ("dpm_solver_2m", "DPMSolverMultistepScheduler", "flow_shift"),
])
def test_scheduler_follows_the_package_sampler(sampler: str | None, cls: str,
                                               shift_key: str) -> None:
    render = RenderDefaults(frames=5, height=32, width=32, fps=16.0, shift=5.0, sampler=sampler)
    cfg = scheduler_config(render)
    scheduler = getattr(diffusers, cls).from_config(cfg)
    assert type(scheduler).__name__ == cls and scheduler.config[shift_key] == 5.0
    scheduler.set_timesteps(4)  # runs in WanPipeline's loop: Heun's 2 evaluations a step
    assert len(scheduler.timesteps) in (4, 2 * 4 - 1) and scheduler.timesteps[0] > 900


# ----------------------------------------------------------------------------- refusals


def _variant(wan_package: str, uri: Path, **over: object) -> str:
    """The imported package with one part swapped (`vae`, `text`)."""
    meta = read_meta(wan_package)
    dit = load_package(wan_package, load_text=False, load_vae=False).dit
    parts = dict(vae=None, vae_ref=meta.vae_ref, vae_config=meta.vae, text=meta.text)
    save_package(str(uri), dit=dit, render=meta.render, **{**parts, **over})
    return str(uri)


def test_refuses_what_diffusers_cannot_reproduce(wan_package: str, render_package: str,
                                                 debug_vae_package: str, tmp_path: Path) -> None:
    own_vae = _variant(wan_package, tmp_path / "own-vae", vae_ref=None, vae_config=None,
                       vae=CausalVideoVAE(vae_config("debug")))
    minilm = _variant(wan_package, tmp_path / "minilm", text=TextEncoderConfig())
    cases = {
        render_package: r"masks padded text tokens \(text_mask=True, t2v's own DiT convention\)",
        own_vae: "the VAE is t2v's own CausalVideoVAE, which diffusers cannot load",
        minilm: "text encoder builtin:minilm is not a T5/umT5 folder",
        debug_vae_package: r"a VAE-only package \(no DiT\): nothing to export",
    }
    for package, message in cases.items():
        out = tmp_path / "out"
        with pytest.raises(WanExportError, match=message) as err:
            run_export_command(ExportConfig(package=package, out=str(out)))
        assert "\n" not in str(err.value) and "only Wan 2.1 packages export" in str(err.value)
        assert not out.exists()  # refused before anything is written


def test_refuses_a_busy_out_in_one_line(wan_package: str, tmp_path: Path, capsys) -> None:
    from t2v.cli import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code = main(["export", "--diffusers", wan_package, str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "is not empty (1 files" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    with pytest.raises(WanExportError, match="overlaps"):
        export_diffusers(wan_package, str(Path(wan_package) / "diffusers"), overwrite=True)
    # overwrite replaces: nothing of what was there survives
    summary = export_diffusers(wan_package, str(out), overwrite=True)
    assert summary["lora"] is None and not (out / "notes.txt").exists()
    assert (out / "model_index.json").exists()
