"""`t2v import --wan`: a tiny Wan 2.1 T2V folder -> package -> render == diffusers' WanPipeline.

Offline: every model is a tiny random one built from its config and written with
`save_pretrained` (the layout of the published `Wan2.1-T2V-*-Diffusers` folders), the tokenizer a
word-level one built with the `tokenizers` library.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from t2v.config import ImportConfig, RenderConfig  # noqa: E402
from t2v.diffusion.sampling import get_noise  # noqa: E402
from t2v.models.package import PackageError, RenderDefaults, load_package, read_meta  # noqa: E402
from t2v.models.text import clean_prompt  # noqa: E402
from t2v.models.tiling import Tiling  # noqa: E402
from t2v.models.wan_import import (  # noqa: E402
    WanImportError,
    run_import_command,
    scheduler_sampler,
)
from t2v.models.wan_vae import WanVAE, WanVAEConfig, wan_vae_config  # noqa: E402
from t2v.render.model import RenderModel, render_batch  # noqa: E402
from t2v.render.pipeline import plan_render  # noqa: E402
from t2v.render.rows import Sample  # noqa: E402
from tests.test_unipc import WAN_UNIPC  # noqa: E402

WORDS = ("a an the red green blue yellow circle square triangle moves left right up down on "
         "black white background").split()
LATENT_STD = [1.5, 0.8, 1.2, 2.0]
LATENT_MEAN = [0.1, -0.2, 0.3, 0.0]
TEXT_LEN = 16
FLOW_SHIFT = 3.0
# Frames of our render vs WanPipeline's "np" output x 255: ours are rounded to uint8, so they
# differ by at most half a level plus float noise (latents agree to ~1e-6 in float32).
PIXEL_ATOL = 0.5 + 1e-3
LATENT_ATOL = 1e-5


def make_wan_folder(root: Path, weight_std: float = 0.1) -> Path:
    """A complete diffusers-format Wan 2.1 T2V folder with tiny random models (~3 s)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # umT5 appends </s> to every prompt: the empty prompt is one real token.
    tok.post_processor = processors.TemplateProcessing(single="$A </s>",
                                                       special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                        eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0)).eval()
    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
        out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32).eval()
    with torch.no_grad():  # Wan zero-initialises parts; random everywhere makes text matter
        for p in transformer.parameters():
            p.normal_(0.0, weight_std)
    vae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True],
                                     latents_mean=LATENT_MEAN, latents_std=LATENT_STD).eval()
    scheduler = diffusers.UniPCMultistepScheduler(**WAN_UNIPC, flow_shift=FLOW_SHIFT)  # Wan's
    pipe = diffusers.WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder,
                                 transformer=transformer, vae=vae, scheduler=scheduler)
    pipe.save_pretrained(root)
    return root


def import_config(wan: Path, out: Path, **over: object) -> ImportConfig:
    base = dict(wan=str(wan), out=str(out), text_max_length=TEXT_LEN, frames=5, height=32,
                width=32)
    return ImportConfig(**{**base, **over})


def test_package_contents(wan_package: str, wan_folder: Path) -> None:
    meta = read_meta(wan_package)
    assert meta.dit.text_mask is False and meta.dit.text_dim == 32 and meta.dit.in_channels == 4
    assert meta.vae_ref == f"diffusers:{wan_folder.resolve()}/vae"
    assert isinstance(meta.vae, WanVAEConfig)
    assert meta.vae.scale == pytest.approx([1 / s for s in LATENT_STD])
    assert meta.vae.shift == pytest.approx(LATENT_MEAN)
    assert (meta.vae.temporal_down, meta.vae.spatial_down) == (4, 8)
    assert meta.text.ref == f"{wan_folder.resolve()}/text_encoder" and meta.text.clean
    assert meta.text.max_length == TEXT_LEN
    assert meta.render == RenderDefaults(frames=5, height=32, width=32, fps=16.0,
                                         shift=FLOW_SHIFT, steps=50, cfg=5.0, sampler="unipc")
    names = sorted(p.name for p in Path(wan_package).iterdir())
    assert names == ["dit.safetensors", "model.json"]  # VAE and text encoder are references


def test_render_matches_wan_pipeline(wan_package: str, wan_folder: Path) -> None:
    """Same prompts, initial noise, steps and guidance -> the frames of the stock WanPipeline,
    which runs the scheduler the folder ships (Wan's UniPC), unpatched."""
    model, _ = RenderModel.load(wan_package, device=torch.device("cpu"))
    assert isinstance(model.vae, WanVAE)
    prompts = ["a red  circle moves left", "the blue square on black background"]
    samples = [Sample(id=f"w{i}", prompt=p, seed=3 + i, steps=5, cfg=5.0, frames=5, height=32,
                      width=32) for i, p in enumerate(prompts)]
    z, videos = render_batch(model, samples, "unipc", FLOW_SHIFT)

    pipe = diffusers.WanPipeline.from_pretrained(wan_folder)
    assert type(pipe.scheduler) is diffusers.UniPCMultistepScheduler
    pipe.set_progress_bar_config(disable=True)
    noise = get_noise(model.vae.latent_shape(5, 32, 32), [3, 4])  # (B, C, T', H', W')
    kwargs = dict(prompt=prompts, negative_prompt=["", ""], height=32, width=32, num_frames=5,
                  num_inference_steps=5, guidance_scale=5.0, latents=noise,
                  max_sequence_length=TEXT_LEN)
    with torch.no_grad():
        ref_z = pipe(**kwargs, output_type="latent").frames  # (B, C, T', H', W')
        ref_frames = pipe(**kwargs, output_type="np").frames  # (B, T, H, W, 3) in [0, 1]
    assert ref_z.abs().max() > 1.0  # non-trivial
    torch.testing.assert_close(z, ref_z, rtol=0, atol=LATENT_ATOL)
    for ours, ref in zip(videos, ref_frames, strict=True):
        assert ours.shape == ref.shape == (5, 32, 32, 3)
        assert np.abs(ours.astype(np.float64) - ref * 255.0).max() <= PIXEL_ATOL
    assert np.abs(videos[0].astype(float) - videos[1].astype(float)).max() > 1  # prompts matter

    # The match rests on Wan's unmasked text convention: masking the padding changes the result.
    model.dit.config.text_mask = True
    z_masked, _ = render_batch(model, samples[:1], "unipc", FLOW_SHIFT)
    assert (z_masked - z[:1]).abs().max() > 100 * LATENT_ATOL


def test_plan_render_takes_the_package_defaults(wan_package: str, tmp_path: Path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    plan = plan_render(RenderConfig(model=wan_package, prompts=str(prompts),
                                    out=str(tmp_path / "out"), dry_run=True))
    assert plan.cfg.shift == FLOW_SHIFT and plan.job.shift == FLOW_SHIFT
    assert (plan.cfg.steps, plan.cfg.cfg, plan.job.fps) == (50, 5.0, 16.0)  # Wan's defaults
    assert plan.cfg.sampler == plan.job.sampler == "unipc"
    (sample,) = plan.todo
    assert (sample.frames, sample.height, sample.width) == (5, 32, 32)


def test_scheduler_sampler_is_unipc_only_for_wans_unipc() -> None:
    wan = {"_class_name": "UniPCMultistepScheduler", **WAN_UNIPC, "flow_shift": 5.0}
    assert scheduler_sampler(wan) == "unipc"
    written = json.loads(diffusers.UniPCMultistepScheduler(**WAN_UNIPC).to_json_string())
    assert written["_class_name"] == "UniPCMultistepScheduler"
    assert scheduler_sampler(written) == "unipc"
    for change in ({"solver_type": "bh1"}, {"solver_order": 3}, {"use_karras_sigmas": True},
                   {"prediction_type": "epsilon"}, {"_class_name": "DPMSolverMultistepScheduler"},
                   {"use_dynamic_shifting": True}):
        assert scheduler_sampler({**wan, **change}) is None, change
    no_flow = {k: v for k, v in wan.items() if k not in ("prediction_type", "use_flow_sigmas")}
    assert scheduler_sampler(no_flow) is None  # diffusers' defaults: epsilon, no flow sigmas
    euler = json.loads(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).to_json_string())
    assert scheduler_sampler(euler) is None and scheduler_sampler(None) is None


def test_wan_vae_backend_contract(wan_folder: Path) -> None:
    """encode_latents/decode: Wan's normalisation, inverse of each other's convention."""
    ref = diffusers.AutoencoderKLWan.from_pretrained(wan_folder / "vae").eval()
    cfg = wan_vae_config(json.loads((wan_folder / "vae" / "config.json").read_text()))
    vae = WanVAE.load(f"diffusers:{wan_folder / 'vae'}", cfg)
    torch.manual_seed(0)
    x = torch.rand(2, 3, 5, 16, 16) * 2 - 1  # (B, 3, T, H, W)
    with torch.no_grad():
        z = vae.encode_latents(x)  # (B, C, T', H', W')
        mean = ref.encode(x).latent_dist.mean
        std, mu = torch.tensor(LATENT_STD).view(1, 4, 1, 1, 1), torch.tensor(LATENT_MEAN).view(
            1, 4, 1, 1, 1)
        torch.testing.assert_close(z, (mean - mu) / std, rtol=1e-5, atol=1e-6)
        assert z.shape == (2, *vae.latent_shape(5, 16, 16))
        pixels = vae.decode(z)
        torch.testing.assert_close(pixels, ref.decode(mean).sample, rtol=0, atol=1e-5)
        torch.testing.assert_close(vae.decode(z, chunk_latent_frames=1), pixels, rtol=0, atol=1e-5)
        # Tiling maps onto diffusers' own (tile and stride in pixels), on for the call only.
        x2 = torch.rand(1, 3, 5, 32, 48) * 2 - 1
        z2, s = vae.encode_latents(x2), cfg.spatial_down
        tiled = vae.decode(z2, tiling=Tiling(2, overlap=1))
        assert not vae.model.use_tiling
        mean2 = ref.encode(x2).latent_dist.mean
        ref.enable_tiling(tile_sample_min_height=2 * s, tile_sample_min_width=2 * s,
                          tile_sample_stride_height=s, tile_sample_stride_width=s)
        want = ref.decode(mean2).sample
        torch.testing.assert_close(tiled, want, rtol=0, atol=1e-5)
        assert not torch.allclose(tiled, vae.decode(z2), atol=1e-4)  # it did tile
    with pytest.raises(ValueError, match="frames=4"):
        vae.latent_shape(4, 16, 16)


def test_clean_prompt_is_wans() -> None:
    assert clean_prompt("  a  red\t&amp;amp; circle \n") == "a red & circle"


def test_package_without_diffusers_is_one_line(wan_package: str, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now fails
    with pytest.raises(PackageError, match=r"pip install 't2v\[diffusers\]'") as err:
        load_package(wan_package, load_text=False)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- refusals


def _edit(folder: Path, path: str, **changes: object) -> None:
    f = folder / path
    data = json.loads(f.read_text())
    f.write_text(json.dumps({**data, **changes}))


REFUSALS = {
    "no model_index": (lambda f: (f / "model_index.json").unlink(), "missing model_index.json"),
    "no transformer weights": (
        lambda f: (f / "transformer" / "diffusion_pytorch_model.safetensors").unlink(),
        r"missing transformer/\*\.safetensors$"),
    "no tokenizer, no vae": (
        lambda f: (shutil.rmtree(f / "tokenizer"), shutil.rmtree(f / "vae")),
        r"missing vae/config\.json, vae/\*\.safetensors, tokenizer/"),
    "image-to-video pipeline": (
        lambda f: _edit(f, "model_index.json", _class_name="WanImageToVideoPipeline"),
        "_class_name='WanImageToVideoPipeline' is not a Wan 2.1 text-to-video"),
    "wan 2.2 two experts": (
        lambda f: _edit(f, "model_index.json", transformer_2=["diffusers",
                                                              "WanTransformer3DModel"],
                        boundary_ratio=0.875), "transformer_2 .*Wan 2.2"),
    "other vae": (lambda f: _edit(f, "vae/config.json", _class_name="AutoencoderKL"),
                  "_class_name='AutoencoderKL', expected AutoencoderKLWan"),
    "bert text encoder": (lambda f: _edit(f, "text_encoder/config.json", model_type="bert"),
                          "model_type='bert', expected umt5"),
    "image-conditioned transformer": (
        lambda f: _edit(f, "transformer/config.json", image_dim=1280),
        "image_dim=1280: an image-conditioned Wan model"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refuses_in_one_line(wan_folder: Path, tmp_path: Path, case: str) -> None:
    src = tmp_path / "wan"
    shutil.copytree(wan_folder, src)
    damage, message = REFUSALS[case]
    damage(src)
    with pytest.raises(WanImportError, match=message) as err:
        run_import_command(import_config(src, tmp_path / "pkg"))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "pkg" / "model.json").exists()


def test_missing_folder_and_cli_line(tmp_path: Path, capsys) -> None:
    from t2v.cli import main

    with pytest.raises(WanImportError, match="empty or missing folder"):
        run_import_command(import_config(tmp_path / "nowhere", tmp_path / "pkg"))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model_index.json").write_text("{}")
    code = main(["import", "--wan", str(tmp_path / "half"), "--out", str(tmp_path / "pkg")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "missing transformer/config.json" in err and "text_encoder/*.safetensors" in err
