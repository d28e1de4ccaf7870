"""The pure parts of t2v import neither ray nor deepspeed (DESIGN.md "Layering")."""

from __future__ import annotations

import subprocess
import sys

PURE = ["t2v.config", "t2v.configfile", "t2v.storage", "t2v.data.video", "t2v.data.tensors",
        "t2v.data.synthetic", "t2v.data.shards",
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


def _import_graph() -> dict[str, set[str]]:
    """t2v module -> the t2v modules it imports anywhere (top level or inside a function),
    read from the source, so a lazy import counts as much as a top-level one."""
    import ast
    from pathlib import Path

    import t2v

    root = Path(t2v.__file__).parent
    names = {".".join(("t2v", *p.relative_to(root).with_suffix("").parts)).removesuffix(
        ".__init__"): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, `level - 1` packages up
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
                deps.add(base)
                deps |= {f"{base}.{a.name}" for a in node.names}  # `from t2v import storage`
        graph[name] = {d for d in deps if d in names and d != name and names[d].name != "__init__.py"}
    return graph


def test_import_graph_has_no_cycle_and_keeps_its_layers():
    graph = _import_graph()
    assert len(graph) > 30 and "t2v.models.package" in graph["t2v.render.pipeline"]
    # Depth-first search for a cycle; report the first one found.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            assert cycle is None, " -> ".join(cycle)
    # Render and serving use models and data I/O, never training code or the encode job.
    for name, deps in graph.items():
        if name.startswith("t2v.render"):
            bad = {d for d in deps if d.startswith("t2v.train") or d == "t2v.data.encode"}
            assert not bad, f"{name} imports {sorted(bad)}"
        if name.startswith(("t2v.models", "t2v.diffusion")):
            bad = {d for d in deps if d.split(".")[1] in ("train", "render", "data", "eval")
                   and d not in ("t2v.data.video", "t2v.data.tensors")}
            assert not bad, f"{name} imports {sorted(bad)}"


READ_PATH = ["t2v.data.video", "t2v.data.shards", "t2v.data.tarsource", "t2v.data.latents",
             "t2v.data.streaming"]


def test_the_read_path_does_not_import_torch():
    """What Ray Data's read tasks, its split coordinator and Ray Train's dataset manager load
    (they unpickle the datasource and decode functions in fresh processes) stays torch-free:
    torch costs each such process ~2 s of a core and ~300 MB. Tensors are made at the
    consumer (t2v/data/collate.py)."""
    code = ("import sys, importlib\n"
            f"for m in {READ_PATH!r}: importlib.import_module(m)\n"
            "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"the read path pulled in: {r.stdout.strip()[:200]}"
