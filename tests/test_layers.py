"""Dependencies point down (design.md §3): every ``import`` of a vlcompress module, at module
level or inside a function, goes to a lower layer or sideways within a layer, and the module
graph has no cycle. Registries and result types are leaves."""

from __future__ import annotations

import ast
from pathlib import Path

import vlcompress

ROOT = Path(vlcompress.__file__).resolve().parent

#: Layer of each top-level piece (higher imports lower). Leaves first.
LAYERS = [
    ("errors", "progress", "atomic", "optional_deps", "config", "envinfo", "methods.registry",
     "runtime.registry"),
    ("data",),
    ("models",),
    ("calibrate", "blockwise", "scoring", "sparsity", "distill", "flops"),
    ("methods", "exporters", "runtime", "eval", "onnx_eval"),
    ("prune",),
    ("report", "gate"),
    ("run_latency",),
    ("quantized_variants",),
    ("speedup_search",),
    ("recover", "api", "pipeline", "bench", "sweep", "serve"),
    ("cli", "__main__", ""),  # "" = the package's __init__ (the public API)
]
LEAVES = {"errors", "progress", "atomic", "optional_deps", "methods.registry", "runtime.registry"}


def _rank(module: str) -> tuple[int, str]:
    rel = module[len("vlcompress"):].lstrip(".")
    if "." not in rel and rel and not any(rel == n or rel.startswith(n + ".")
                                          for names in LAYERS for n in names if n):
        rel = ""  # a name of the package itself (``from . import __version__``)
    best = None
    for i, names in enumerate(LAYERS):
        for n in names:
            if rel == n or (n and rel.startswith(n + ".")) or (n == "" and rel == ""):
                if best is None or len(n) > len(best[1]):
                    best = (i, n)
    assert best is not None, f"module {module} has no layer in tests/test_layers.py"
    return best


def _imports():
    edges = []
    for f in sorted(ROOT.rglob("*.py")):
        parts = f.relative_to(ROOT.parent).with_suffix("").parts
        mod = ".".join(parts)
        is_pkg = mod.endswith(".__init__")
        if is_pkg:
            mod = mod[: -len(".__init__")]
        pkg = mod if is_pkg else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                targets = [target]
                if node.module is None:  # from . import x: x may be a module
                    targets = [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                if t == "vlcompress" or t.startswith("vlcompress."):
                    edges.append((mod, t, node.lineno))
    return edges


def test_every_import_points_down():
    bad = []
    for src, dst, line in _imports():
        (rs, ns), (rd, nd) = _rank(src), _rank(dst)
        if rd > rs:
            bad.append(f"{src}:{line} imports {dst} (layer {nd or 'vlcompress'} is above "
                       f"{ns or 'vlcompress'})")
        if ns in LEAVES and nd not in LEAVES and nd != ns and dst != "vlcompress.errors":
            bad.append(f"{src}:{line} imports {dst}: {ns} is a leaf")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    graph: dict[str, set[str]] = {}
    modules = set()
    for src, dst, _ in _imports():
        graph.setdefault(src, set()).add(dst)
        modules.update((src, dst))

    def resolve(name: str) -> str:  # "vlcompress.models.VLM" -> "vlcompress.models"
        while name not in graph and "." in name and name not in modules:
            name = name.rsplit(".", 1)[0]
        return name

    g = {s: {resolve(d) for d in ds if resolve(d) != s} for s, ds in graph.items()}
    # a package importing its own submodules (re-exports) is not a cycle through them
    g = {s: {d for d in ds if not d.startswith(s + ".")} for s, ds in g.items()}
    seen, stack, cycles = set(), [], []

    def visit(n):
        if n in stack:
            cycles.append(stack[stack.index(n):] + [n])
            return
        if n in seen:
            return
        seen.add(n)
        stack.append(n)
        for d in sorted(g.get(n, ())):
            visit(d)
        stack.pop()

    for n in sorted(g):
        visit(n)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles[:10])
