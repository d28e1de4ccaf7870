"""Hugging Face Hub ids where a path is accepted (t2v/hub.py): `hf:ORG/NAME[@REV][/SUB]`.

Every test builds a Hub cache in huggingface_hub's own layout (models--ORG--NAME/refs/main ->
snapshots/COMMIT/...) under a temporary HF_HOME and runs with HF_HUB_OFFLINE=1: nothing here
reaches a network, exactly as a cluster without internet would run with a pre-filled cache.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from t2v import hub, storage
from t2v.models.package import package_hash, read_meta
from t2v.models.text import BUILTIN_MINILM, TextEncoder, TextEncoderConfig, resolve_model_dir
from t2v.runtime import check_output_uri
from tests.test_cli import ROOT


def cache_repo(home: Path, repo_id: str, src: Path, revision: str = "main") -> str:
    """Put folder `src` into the Hub cache under HF_HOME=`home` as `repo_id` at `revision`, as
    `hf download` leaves it (files in snapshots/COMMIT, the branch in refs/); returns COMMIT."""
    commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    repo = home / "hub" / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(src, repo / "snapshots" / commit, dirs_exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return commit


@pytest.fixture
def hf_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "hf-home"
    home.mkdir()
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


@pytest.mark.parametrize("ref, want", [
    ("hf:Wan-AI/Wan2.1-T2V-1.3B-Diffusers", ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", None, "")),
    ("hf:org/name@v1.0/text_encoder", ("org/name", "v1.0", "text_encoder")),
    ("hf:org/name/a/b/", ("org/name", None, "a/b")),
])
def test_parse(ref: str, want: tuple) -> None:
    got = hub.parse(ref)
    assert (got.repo_id, got.revision, got.subpath) == want
    assert hub.parse(str(got)) == got  # str() is the canonical form and parses back


@pytest.mark.parametrize("ref", ["hf:org", "hf:/org/name", "hf:org/name/../x", "org/name",
                                 "hf:org/na me"])
def test_parse_refuses_in_one_line(ref: str) -> None:
    with pytest.raises(hub.HubError, match=r"expected a Hub id hf:ORG/NAME"):
        hub.parse(ref)


def test_bare_repo_id_only_where_no_such_path(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert hub.bare_repo_id("Wan-AI/Wan2.1-T2V-1.3B-Diffusers") == \
        "hf:Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert hub.bare_repo_id("org/name") is None  # an existing folder always wins
    for ref in ("/abs/path", "./org/x", "s3://b/k", "a/b/c", "hf:org/name"):
        assert hub.bare_repo_id(ref) is None


def test_storage_reads_a_package_from_the_cache(hf_home, render_package) -> None:
    commit = cache_repo(hf_home, "acme/t2v-debug", Path(render_package))
    ref = "hf:acme/t2v-debug"
    assert read_meta(ref).to_json() == read_meta(render_package).to_json()
    assert package_hash(ref) == package_hash(render_package)  # the same bytes, file by file
    files = storage.list_prefix(ref)
    assert f"{ref}/model.json" in files and all(f.startswith(ref + "/") for f in files)
    assert hub.pin(ref) == f"hf:acme/t2v-debug@{commit}"
    assert hub.pin(render_package) == render_package
    # A pinned reference resolves to the same snapshot.
    assert storage.read_bytes(f"hf:acme/t2v-debug@{commit}/model.json") == \
        (Path(render_package) / "model.json").read_bytes()


def test_hub_references_are_read_only(hf_home, tmp_path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "x.txt").write_text("cached")
    cache_repo(hf_home, "acme/ro", tmp_path / "src")
    for write in (lambda: storage.write_text("hf:acme/ro/x.txt", "x"),
                  lambda: storage.delete("hf:acme/ro/x.txt"),
                  lambda: check_output_uri("hf:acme/ro")):
        with pytest.raises(ValueError, match="read-only"):
            write()
    assert storage.read_text("hf:acme/ro/x.txt") == "cached"


def test_offline_with_nothing_cached_is_one_line(hf_home) -> None:
    with pytest.raises(hub.HubError) as e:
        storage.read_bytes("hf:nobody/nothing@v2/model.json")
    msg = str(e.value)
    assert "\n" not in msg and "HF_HUB_OFFLINE=1" in msg and str(hf_home / "hub") in msg
    assert "hf download nobody/nothing --revision v2" in msg


def test_text_encoder_from_the_cache(hf_home) -> None:
    """A transformers encoder named by Hub id gives the same embeddings as the same files on
    disk (here the builtin MiniLM's folder, cached as if downloaded)."""
    cache_repo(hf_home, "sentence-transformers/all-MiniLM-L6-v2",
               resolve_model_dir(BUILTIN_MINILM))
    prompts = ["a red circle moving left", "a blue square"]
    local = TextEncoder(TextEncoderConfig(max_length=16))(prompts)
    cached = TextEncoder(TextEncoderConfig(ref="hf:sentence-transformers/all-MiniLM-L6-v2",
                                           max_length=16))(prompts)
    for a, b in zip(local, cached, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="config.json missing"):
        resolve_model_dir("hf:sentence-transformers/all-MiniLM-L6-v2/no_such_folder")


def test_cli_names_what_to_download(hf_home, tmp_path) -> None:
    r = subprocess.run([sys.executable, "-m", "t2v", "render", "--model", "hf:acme/missing",
                        "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "out")],
                       cwd=ROOT, text=True, capture_output=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "hf download acme/missing" in lines[0], lines
    assert not r.stdout.strip()


def test_import_wan_by_bare_hub_id_pins_its_references(hf_home, tmp_path, monkeypatch,
                                                       wan_folder, wan_package) -> None:
    """`t2v import --wan ORG/NAME` from a cached snapshot: the package refers to the snapshot by
    pinned Hub ids (so any node resolves the same bytes), loads whole (DiT, Wan VAE, umT5), and
    holds the same DiT as an import of the same folder from disk."""
    from t2v.models.package import load_package
    from t2v.models.wan_import import run_import_command
    from tests.test_wan_import import import_config

    commit = cache_repo(hf_home, "Wan-AI/Wan2.1-T2V-Tiny-Diffusers", wan_folder)
    monkeypatch.chdir(tmp_path)  # no local folder of that name here
    result = run_import_command(import_config(Path("Wan-AI/Wan2.1-T2V-Tiny-Diffusers"),
                                              tmp_path / "from-hub"))
    pinned = f"hf:Wan-AI/Wan2.1-T2V-Tiny-Diffusers@{commit}"
    meta = read_meta(str(tmp_path / "from-hub"))
    assert meta.text.ref == f"{pinned}/text_encoder" and meta.text.tokenizer == f"{pinned}/tokenizer"
    assert meta.vae_ref == f"diffusers:{pinned}/vae" and result["text_encoder"] == meta.text.ref
    assert meta.run["imported_from"] == pinned
    hub_pkg = load_package(str(tmp_path / "from-hub"))
    disk_pkg = load_package(wan_package)  # the same folder imported from disk
    assert hub_pkg.vae is not None and hub_pkg.text is not None
    for (k, a), (_, b) in zip(hub_pkg.dit.state_dict().items(), disk_pkg.dit.state_dict().items(),
                              strict=True):
        assert torch.equal(a, b), k
    prompts = ["a red circle"]
    torch.testing.assert_close(hub_pkg.text(prompts)[0], disk_pkg.text(prompts)[0], rtol=0, atol=0)
