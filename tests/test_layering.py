"""The pure parts of t2v import neither ray nor deepspeed (DESIGN.md "Layering")."""

from __future__ import annotations

import subprocess
import sys

PURE = ["t2v.config", "t2v.storage", "t2v.data.video", "t2v.data.synthetic", "t2v.data.shards",
        "t2v.render.prompts", "t2v.render.manifest"]
PURE_PACKAGES = ["t2v.models", "t2v.diffusion", "t2v.eval"]


def test_pure_modules_do_not_import_ray_or_deepspeed():
    import pkgutil

    import t2v

    modules = list(PURE)
    for pkg in PURE_PACKAGES:
        mod = __import__(pkg, fromlist=["_"])
        modules += [f"{pkg}.{m.name}" for m in pkgutil.iter_modules(mod.__path__)]
    assert t2v  # the package itself is importable
    code = (
        "import sys, importlib\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'deepspeed'))\n"
        "print(','.join(bad))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"pure modules pulled in: {r.stdout.strip()}"
