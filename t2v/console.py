"""What a person at the terminal sees: our progress lines, once; the frameworks' chatter in a log.

A demo on a laptop prints a few hundred lines, most of them Ray's and DeepSpeed's (warnings,
start-up banners, every worker line prefixed `(RayTrainWorker pid=...)` in colour). `quiet`
sends everything the process writes to file descriptors 1 and 2 (Python, C++ libraries, Ray's
forwarded worker output) to a log file, and echoes to the terminal only our own lines
(`[t2v] ...`, `[demo ...]`, `[render] ...`, ...) with Ray's prefix and colour codes removed and
repeats dropped. Descriptors, not `sys.stdout`: C++ code and loggers bound to the old stream
write there too; and a file, not a pipe: processes started meanwhile (Ray's own) inherit the
descriptor and may write to it after we stop reading, which a file takes and a pipe would not.
"""

from __future__ import annotations

import io
import os
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

OURS = re.compile(r"^(\[(t2v|demo|render|encode|eval|synth|pack|train|val|import)\b|t2v \w+: )")
"""Our lines: a bracketed stage tag, or the CLI's one-line `t2v CMD: error: ...`."""
RAY_PREFIX = re.compile(r"^\((?:[^()]|\([^()]*\))*\)\s+")
"""Ray's `(ActorName pid=123, ip=...) ` before a forwarded worker line."""
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def say(line: str) -> None:
    """One line to stdout, written, not printed. Code that runs in Ray Train workers says what
    it does with this: there `print` is Ray Train's (`RAY_TRAIN_ENABLE_PRINT_PATCH`), which in
    Ray 2.60 both prints a line (Ray's workers replace `sys.stdout`, and it tees to any stdout
    that is not `sys.__stdout__`) and logs it to stderr, so each line reached the driver twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def clean(line: str) -> str:
    """A log line without colour codes and without Ray's forwarding prefix."""
    return RAY_PREFIX.sub("", ANSI.sub("", line), count=1).rstrip("\r\n")


class Echo:
    """Follows a log file from an offset and writes our lines to `terminal`, once each."""

    def __init__(self, path: Path, offset: int, terminal) -> None:  # noqa: ANN001 - a text file
        self.path, self.terminal = path, terminal
        self.file = open(path, "rb")  # noqa: SIM115 - closed in close()
        self.file.seek(offset)
        self.recent: deque[str] = deque(maxlen=64)
        self.pending = b""
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="t2v-console", daemon=True)

    def start(self) -> Echo:
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self.stop.wait(0.1):
            self.pump()

    def pump(self) -> None:
        """Echo what the log has gained since the last call (also from the caller's thread:
        `Console.say` catches up first, so lines keep their order)."""
        with self.lock:
            *lines, self.pending = (self.pending + self.file.read()).split(b"\n")
            for raw in lines:
                self._line(raw)

    def _line(self, raw: bytes) -> None:
        line = clean(raw.decode("utf-8", errors="replace"))
        if not OURS.match(line) or line in self.recent:  # Ray may forward a line twice
            return
        self.recent.append(line)
        self.terminal.write(line + "\n")
        self.terminal.flush()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        self.pump()
        if self.pending:
            self._line(self.pending)
        self.file.close()


class Console:
    """Where `say` reaches the person at the terminal, inside `quiet` or not."""

    def __init__(self, echo: Echo | None = None) -> None:
        self.echo = echo

    def say(self, text: str) -> None:
        if self.echo is not None:
            self.echo.pump()  # what came before goes first
            self.echo.terminal.write(text + "\n")
            self.echo.terminal.flush()
            self.echo.recent.extend(text.splitlines())  # not echoed again from the log
        print(text, flush=True)  # into the log as well, inside `quiet`


def _settle(path: Path, quiet_s: float = 0.3, limit_s: float = 2.0) -> None:
    """Wait until the log stops growing for `quiet_s` (Ray forwards worker lines a little
    late), at most `limit_s`."""
    deadline, size, since = time.time() + limit_s, -1, time.time()
    while time.time() < deadline:
        now = path.stat().st_size
        if now != size:
            size, since = now, time.time()
        elif time.time() - since >= quiet_s:
            return
        time.sleep(0.05)


@contextmanager
def quiet(log_path: str | Path, verbose: bool = False) -> Iterator[Console]:
    """Inside: fds 1 and 2 append to `log_path`; our lines are echoed to the terminal, and
    the yielded Console's `say` writes there directly. Does nothing (say = print) when
    `verbose`, or when stdout is not a file descriptor (a test's capture)."""
    try:
        fds = sys.stdout.fileno(), sys.stderr.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):
        fds = None
    if verbose or fds != (1, 2):
        yield Console()
        return
    path = Path(log_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved[0]), "w", buffering=1, encoding="utf-8",
                         errors="replace")
    with open(path, "ab") as log:
        offset = log.tell()
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    echo = Echo(path, offset, terminal).start()
    try:
        yield Console(echo)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        _settle(path)
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        echo.close()
        terminal.close()
