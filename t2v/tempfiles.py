"""Local temp files named after their writer, and the atomic replace of a local file.

Every temp file t2v writes starts with TMP_PREFIX + host + "_" + pid (`tmp_owner`), so a later
process can tell the leftovers of a killed writer (SIGKILL, OOM: nothing of it runs any more)
from a live writer's: t2v/storage.py removes those under an output directory
(`remove_stale_temps`), and `owned_tempfile` those in the system temp dir.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_PREFIX = ".t2v-tmp-"
_UMASK = os.umask(0o022)  # read once at import: os.umask can only be read by setting it
os.umask(_UMASK)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # makes the rename itself durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def replace_local(target: Path, suffix: str = "") -> Iterator[Path]:
    """A temp file beside ``target`` (same filesystem: the rename is atomic); on clean exit
    fsync + os.replace onto it, so after a crash ``target`` is the old file or the new one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f"{tmp_owner()}.{target.name}.",
                                suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; match what open() would create
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


def writer_host() -> str:
    return socket.gethostname().replace(".", "-")  # no "." in a temp file's owner part


def tmp_owner() -> str:
    """A temp file's name starts with its writer: TMP_PREFIX + host + "_" + pid."""
    return f"{TMP_PREFIX}{writer_host()}_{os.getpid()}"


TMP_OWNER = re.compile(rf"^{re.escape(TMP_PREFIX)}(?P<host>[^.]*)_(?P<pid>\d+)\.")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


_swept_tempdir = False


def owned_tempfile(suffix: str = "", directory: bool = False) -> Path:
    """A temp file (or folder) in the system temp dir, named after its writer. The first one a
    process makes also removes those whose writer on this host is dead: an upload or download
    killed mid-way (SIGKILL, OOM) leaves its whole local copy behind, a package's size each."""
    global _swept_tempdir
    if not _swept_tempdir:
        _swept_tempdir = True
        host = writer_host()
        with os.scandir(tempfile.gettempdir()) as entries:
            for e in entries:
                m = TMP_OWNER.match(e.name)
                if not m or m["host"] != host or pid_alive(int(m["pid"])):
                    continue
                if e.is_dir(follow_symlinks=False):
                    shutil.rmtree(e.path, ignore_errors=True)
                else:
                    Path(e.path).unlink(missing_ok=True)
    if directory:
        return Path(tempfile.mkdtemp(prefix=tmp_owner() + "."))
    fd, name = tempfile.mkstemp(prefix=tmp_owner() + ".", suffix=suffix)
    os.close(fd)
    return Path(name)
