"""A headless Chromium driven over the Chrome DevTools Protocol, for tests of the web page.

Debian's `chromium` (installed by `make test` where apt can) with `--remote-debugging-port=0`;
the port is read from DevToolsActivePort in the profile folder and one page target is driven
over its websocket (the `websockets` package, which Ray Serve's uvicorn already brings). No
Selenium, no downloaded driver. Background networking is off: the browser only talks to the
127.0.0.1 server it is pointed at.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import requests
from PIL import Image
from websockets.sync.client import connect

FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-default-apps",
         "--disable-extensions", "--mute-audio", "--hide-scrollbars",
         "--autoplay-policy=no-user-gesture-required", "--window-size=1000,1400",
         "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0"]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    """One headless browser process with one page; a context manager that leaves nothing
    running (its whole process group is killed on exit)."""

    def __init__(self, binary: str, timeout: float = 60.0) -> None:
        self.profile = Path(tempfile.mkdtemp(prefix="t2v-chromium-"))
        self.proc = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={self.profile}",
                                      "about:blank"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        port_file, deadline = self.profile / "DevToolsActivePort", time.time() + timeout
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.time() > deadline:
                self.close()
                raise RuntimeError(f"{binary} gave no DevTools port (exit {self.proc.poll()})")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        pages = [t for t in requests.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
                 if t["type"] == "page"]
        self.ws = connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=10)
        self.next_id = 0

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Browser.close (chromium then reaps its own helpers), else kill the process group."""
        if getattr(self, "ws", None) is not None:
            try:
                self.send("Browser.close")
            except Exception:  # noqa: BLE001 - already gone: the group kill below cleans up
                pass
            self.ws.close()
            self.ws = None
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # helpers that outlived the main process
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        shutil.rmtree(self.profile, ignore_errors=True)

    def send(self, method: str, **params: object) -> dict:
        """One CDP command; its result (events arriving meanwhile are dropped)."""
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def eval(self, expression: str) -> object:
        """Evaluate JS in the page (promises awaited); its value, or the page's exception."""
        r = self.send("Runtime.evaluate", expression=expression, awaitPromise=True,
                      returnByValue=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"JS: {r['exceptionDetails'].get('exception', r['exceptionDetails'])}")
        return r["result"].get("value")

    def goto(self, url: str, timeout: float = 30.0) -> None:
        self.send("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete' && location.href !== 'about:blank'",
                      timeout)

    def wait_for(self, expression: str, timeout: float = 60.0, every: float = 0.1) -> object:
        """Poll a JS expression until it is truthy; its value."""
        deadline = time.time() + timeout
        while True:
            value = self.eval(expression)
            if value:
                return value
            if time.time() > deadline:
                raise AssertionError(f"not true within {timeout} s: {expression}")
            time.sleep(every)

    def screenshot(self) -> Image.Image:
        png = self.send("Page.captureScreenshot", format="png")["data"]
        return Image.open(io.BytesIO(base64.b64decode(png))).convert("RGB")

    def box(self, selector: str) -> tuple[int, int, int, int]:
        """The element's box in screenshot pixels (left, top, right, bottom)."""
        left, top, right, bottom, scale = self.eval(
            f"(() => {{const r = document.querySelector({json.dumps(selector)})"
            ".getBoundingClientRect(); const s = window.devicePixelRatio;"
            "return [r.left, r.top, r.right, r.bottom, s];})()")
        return (round(left * scale), round(top * scale), round(right * scale),
                round(bottom * scale))
