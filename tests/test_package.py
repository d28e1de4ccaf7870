"""Model packages: save -> load -> identical outputs, locally and on S3; hash; refusals."""

from __future__ import annotations

import json

import pytest
import torch

from t2v import storage
from t2v.models.dit import VideoDiT, dit_config
from t2v.models.package import (
    PackageError,
    RenderDefaults,
    load_package,
    package_hash,
    read_meta,
    save_package,
)
from t2v.models.text import TextEncoderConfig
from t2v.models.vae import CausalVideoVAE, vae_config

RENDER = RenderDefaults(frames=5, height=16, width=16, fps=12.0, shift=2.0)


def randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial weights: the DiT's zero-initialised output would hide a broken load."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return module


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    vae = randomise(CausalVideoVAE(vae_config("debug", scale=0.7, shift=0.1)), 1).eval()
    dit = randomise(VideoDiT(dit_config("debug", in_channels=vae.config.latent_channels)), 2)
    return vae, dit.eval()


def outputs(vae, dit, text_emb, mask):
    g = torch.Generator().manual_seed(3)
    video = torch.rand(1, 3, 5, 16, 16, generator=g) * 2 - 1
    z = vae.encode_latents(video)
    v = dit(z, torch.tensor([0.3]), text_emb, mask)
    return z, v, vae.decode(z)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_round_trip_identical_outputs(models, where, tmp_path, request):
    vae, dit = models
    root = (str(tmp_path / "pkg") if where == "local"
            else storage.join(request.getfixturevalue("s3_bucket"), "pkg"))
    h = save_package(root, vae=vae, dit=dit, text=TextEncoderConfig(max_length=8),
                     render=RENDER, run={"name": "unit", "step": 7})
    pkg = load_package(root)
    assert pkg.hash == h == package_hash(root) and len(h) == 64
    assert pkg.meta.run == {"name": "unit", "step": 7} and pkg.meta.render == RENDER
    assert pkg.meta.vae.scale == vae.config.scale and pkg.meta.vae.shift == vae.config.shift
    emb, mask = pkg.text(["a red circle moving left"])
    assert emb.shape == (1, 8, 384)
    for a, b in zip(outputs(vae, dit, emb, mask), outputs(pkg.vae, pkg.dit, emb, mask),
                    strict=True):
        assert torch.equal(a, b)
    # Same content -> same hash; different weights -> different hash.
    assert save_package(root, vae=vae, dit=dit, text=TextEncoderConfig(max_length=8),
                        render=RENDER, run={"name": "unit", "step": 7}) == h
    other = randomise(VideoDiT(dit.config), 9)
    assert save_package(root, vae=vae, dit=other, text=TextEncoderConfig(max_length=8),
                        render=RENDER, run={"name": "unit", "step": 7}) != h


def test_vae_only_package(models, tmp_path):
    vae, _ = models
    save_package(str(tmp_path), vae=vae, run={"stage": "vae"})
    pkg = load_package(str(tmp_path))
    assert pkg.dit is None and pkg.text is None and pkg.meta.dit is None
    assert pkg.meta.render is None
    assert not (tmp_path / "dit.safetensors").exists()


def test_refusals(models, tmp_path):
    vae, dit = models
    with pytest.raises(PackageError, match="not a model package"):
        load_package(str(tmp_path / "empty"))
    root = tmp_path / "pkg"
    save_package(str(root), vae=vae, dit=dit, render=RENDER)
    meta = json.loads((root / "model.json").read_text())
    (root / "model.json").write_text(json.dumps(meta | {"format_version": 99}))
    with pytest.raises(PackageError, match="format_version 99"):
        read_meta(str(root))
    (root / "model.json").write_text(json.dumps(meta | {"dit": meta["dit"] | {"depth": 5}}))
    with pytest.raises(PackageError, match="weights do not match the config"):
        load_package(str(root), load_text=False)
    (root / "model.json").write_text(json.dumps(meta))
    (root / "dit.safetensors").unlink()
    with pytest.raises(PackageError, match="dit.safetensors is missing"):
        load_package(str(root))
    (root / "model.json").write_text("{not json")
    with pytest.raises(PackageError, match="invalid"):
        read_meta(str(root))


class _Payload:
    """Unpickling this would create a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_is_never_loaded(models, tmp_path):
    """A pickle named like a weight file is refused, and its payload never runs."""
    vae, dit = models
    save_package(str(tmp_path), vae=vae, dit=dit, render=RENDER)
    marker = tmp_path / "pwned"
    torch.save({"w": _Payload(marker)}, tmp_path / "dit.safetensors")
    with pytest.raises(PackageError, match="not a safetensors file"):
        load_package(str(tmp_path), load_text=False)
    assert not marker.exists()


def test_render_defaults_are_required_typed_and_migrated(models, tmp_path):
    """A DiT package must say how it renders; version-1 packages migrate their `run` keys."""
    vae, dit = models
    with pytest.raises(ValueError, match="needs its render defaults"):
        save_package(str(tmp_path / "x"), vae=vae, dit=dit)
    root = tmp_path / "pkg"
    save_package(str(root), vae=vae, dit=dit, render=RENDER)
    meta = json.loads((root / "model.json").read_text())
    assert meta["format_version"] == 2 and meta["render"]["frames"] == 5
    for bad, why in (({"frames": 0}, "render.frames"), ({"fps": -1}, "render.fps"),
                     ({"speed": 2}, "unknown keys")):
        (root / "model.json").write_text(json.dumps(meta | {"render": meta["render"] | bad}))
        with pytest.raises(PackageError, match=why):
            read_meta(str(root))
    # Version 1: imported packages kept the geometry in `run`; trained ones had none.
    v1 = {k: v for k, v in meta.items() if k != "render"} | {"format_version": 1}
    run = {"stage": "import", "frames": 81, "height": 480, "width": 832, "shift": 3.0}
    (root / "model.json").write_text(json.dumps(v1 | {"run": run}))
    assert read_meta(str(root)).render == RenderDefaults(81, 480, 832, fps=8.0, shift=3.0)
    (root / "model.json").write_text(json.dumps(v1 | {"run": {"stage": "dit", "step": 3}}))
    assert read_meta(str(root)).render is None


def test_multipart_package_round_trips_bit_identically(moto_s3, s3_bucket, monkeypatch):
    """Parts of 5 MiB (S3's smallest): a 13.6 MB dit.safetensors goes up in 3 parts, written
    from a local file, and comes back bit-identical with the same content hash."""
    monkeypatch.setenv(storage.PART_MIB_ENV, "5")
    dit = randomise(VideoDiT(dit_config("debug", depth=12)), 3)
    vae = randomise(CausalVideoVAE(vae_config("debug")), 4)
    uri = f"{s3_bucket}/big"
    digest = save_package(uri, vae=vae, dit=dit, render=RENDER)
    bucket, key = storage.split_s3(f"{uri}/dit.safetensors")
    head = moto_s3.client().head_object(Bucket=bucket, Key=key)
    parts = -(-head["ContentLength"] // (5 * 2**20))
    assert parts >= 3 and head["ETag"].strip('"').endswith(f"-{parts}")  # a multipart object
    pkg = load_package(uri, load_text=False)
    assert pkg.hash == digest == package_hash(uri)
    for name, tensor in dit.state_dict().items():
        assert torch.equal(pkg.dit.state_dict()[name], tensor), name


KILLED_UPLOAD = """
import sys
from t2v.models.dit import VideoDiT, dit_config
from t2v.models.package import RenderDefaults, save_package
from t2v.models.vae import CausalVideoVAE, vae_config

save_package(sys.argv[1], vae=CausalVideoVAE(vae_config("debug")),
             dit=VideoDiT(dit_config("debug", depth=80)),
             render=RenderDefaults(frames=5, height=16, width=16, fps=12.0))
"""


def test_upload_killed_midway_leaves_no_object(moto_s3, s3_bucket):
    """SIGKILL the writer while dit.safetensors (~110 MB, 22 parts of 5 MiB) is half uploaded:
    no object at its key, no model.json, so nothing reads as a package."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    uri = f"{s3_bucket}/killed"
    bucket, key = storage.split_s3(f"{uri}/dit.safetensors")
    s3 = moto_s3.client()
    env = {**os.environ, storage.PART_MIB_ENV: "5",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_UPLOAD, uri], env=env)
    parts, deadline = 0, time.time() + 120
    try:
        while parts < 2 and proc.poll() is None and time.time() < deadline:
            uploads = s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
            if uploads:
                parts = len(s3.list_parts(Bucket=bucket, Key=key,
                                          UploadId=uploads[0]["UploadId"]).get("Parts", []))
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL and parts >= 2  # killed with the upload under way
    assert not storage.exists(f"{uri}/dit.safetensors")
    assert not storage.exists(f"{uri}/model.json")
    with pytest.raises(PackageError, match="not a model package"):
        load_package(uri)


def test_bf16_export_halves_the_dit_and_loads_in_any_dtype(tmp_path):
    dit = randomise(VideoDiT(dit_config("debug")), 5)
    vae = randomise(CausalVideoVAE(vae_config("debug")), 6)
    save_package(str(tmp_path / "fp32"), vae=vae, dit=dit, render=RENDER)
    save_package(str(tmp_path / "bf16"), vae=vae, dit=dit, render=RENDER,
                 dit_dtype=torch.bfloat16)
    size = {p: (tmp_path / p / "dit.safetensors").stat().st_size for p in ("fp32", "bf16")}
    assert size["bf16"] < 0.52 * size["fp32"]
    # The VAE is stored as it was: only the DiT is cast.
    assert ((tmp_path / "bf16" / "vae.safetensors").read_bytes()
            == (tmp_path / "fp32" / "vae.safetensors").read_bytes())
    pkg = load_package(str(tmp_path / "bf16"), load_text=False)  # built in float32
    for name, tensor in dit.state_dict().items():
        got = pkg.dit.state_dict()[name]
        assert got.dtype == torch.float32
        assert torch.equal(got, tensor.to(torch.bfloat16).float()), name
