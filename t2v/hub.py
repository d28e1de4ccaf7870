"""Hugging Face Hub ids where a path is accepted: `hf:ORG/NAME[@REVISION][/SUB/PATH]`.

A Hub reference resolves to a folder of the local Hugging Face cache (`huggingface_hub`'s own
layout and rules: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub), read at call
time so a job's environment decides. With `HF_HUB_OFFLINE=1` nothing is fetched: a cached
snapshot is used, and a missing one is one line saying what to download where. Online, the repo
is downloaded into the cache once per machine (shared by every process on it); a process
resolves each repo once.

Packages refer to what they import by a *pinned* reference (`hf:ORG/NAME@COMMIT/text_encoder`),
so every node of a cluster resolves the same bytes from its own cache.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

PREFIX = "hf:"
_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_REF = re.compile(rf"^(?P<repo>{_PART}/{_PART})(?:@(?P<rev>[A-Za-z0-9._-]+))?(?P<sub>(?:/[^/]+)*)/?$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")


class HubError(ValueError):
    """A Hub reference that cannot be used here; the message is one line."""


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    revision: str | None = None
    """A branch, tag or commit; None: the repo's main branch."""
    subpath: str = ""
    """A folder inside the repo ("" for its root), e.g. "text_encoder"."""

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        sub = f"/{self.subpath}" if self.subpath else ""
        return f"{PREFIX}{self.repo_id}{rev}{sub}"

    def pinned(self, commit: str) -> HubRef:
        return HubRef(self.repo_id, commit, self.subpath)


def is_hub(ref: object) -> bool:
    return isinstance(ref, str) and ref.startswith(PREFIX)


def parse(ref: str) -> HubRef:
    """`hf:ORG/NAME[@REV][/SUB/PATH]` -> HubRef, or HubError naming the expected form."""
    m = _REF.match(ref[len(PREFIX):]) if is_hub(ref) else None
    if m is None or ".." in m["sub"].split("/"):
        raise HubError(f"{ref!r}: expected a Hub id hf:ORG/NAME[@REVISION][/SUB/PATH]")
    return HubRef(m["repo"], m["rev"], m["sub"].strip("/"))


def bare_repo_id(ref: str) -> str | None:
    """`ORG/NAME` given where a folder is expected, when no such local folder exists: the Hub
    id it names (as `hf:ORG/NAME`), else None. An existing path always wins."""
    if is_hub(ref) or "://" in ref or ref.startswith(("/", ".", "~")) or Path(ref).exists():
        return None
    return PREFIX + ref if _REF.match(ref) and ref.count("/") == 1 else None


def offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it (1/true/yes/on), at call time."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def cache_dir() -> Path:
    """The Hub cache huggingface_hub uses with this environment."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def snapshot(ref: HubRef) -> tuple[Path, str]:
    """(the local snapshot folder of `ref`'s repo, its commit hash), downloading the repo first
    unless offline. HubError (one line) when it is not there and cannot be had."""
    # heavy-ish and optional at run time: only a Hub reference needs it.
    from huggingface_hub import snapshot_download  # noqa: PLC0415
    from huggingface_hub.errors import (  # noqa: PLC0415
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache = cache_dir()
    is_offline = offline()
    try:
        folder = Path(snapshot_download(ref.repo_id, revision=ref.revision, cache_dir=cache,
                                        local_files_only=is_offline))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, FileNotFoundError):
        why = "HF_HUB_OFFLINE=1" if is_offline else "the Hub cannot be reached"
        rev = f" --revision {ref.revision}" if ref.revision else ""
        raise HubError(f"{ref}: not in the Hugging Face cache {cache} and {why}: on a machine "
                       f"with network run `hf download {ref.repo_id}{rev}` with HF_HOME or "
                       f"HF_HUB_CACHE set to a cache you then copy here, or give a local "
                       f"folder") from None
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as e:
        raise HubError(f"{ref}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    commit = folder.name if COMMIT.match(folder.name) else (ref.revision or "")
    return folder, commit


_SNAPSHOTS: dict[tuple[str, str | None, str, bool], tuple[Path, str]] = {}


def _repo_snapshot(ref: HubRef) -> tuple[Path, str]:
    """The whole repo's snapshot (folder, commit), resolved once per process: a package or a
    Wan folder is read file by file, and each file must not cost a round trip to the Hub."""
    key = (ref.repo_id, ref.revision, str(cache_dir()), offline())
    if key not in _SNAPSHOTS:
        _SNAPSHOTS[key] = snapshot(HubRef(ref.repo_id, ref.revision))
    return _SNAPSHOTS[key]


def local_path(ref: str) -> Path:
    """The local file or folder `hf:ORG/NAME[@REV]/SUB/PATH` names inside its repo's snapshot
    (which may not exist there: the caller's read then fails as for any missing path)."""
    hub = parse(ref)
    root, _ = _repo_snapshot(hub)
    return root / hub.subpath if hub.subpath else root


def pin(ref: str) -> str:
    """A Hub reference pinned to the commit its snapshot resolved to (what a package records,
    so every node reads the same bytes); anything else unchanged."""
    if not is_hub(ref):
        return ref
    hub = parse(ref)
    _, commit = _repo_snapshot(hub)
    return str(hub.pinned(commit)) if commit else ref
