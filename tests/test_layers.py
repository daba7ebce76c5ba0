"""Dependencies point down (docs/design.md, "Layers"): every ``import`` of a vlcompress module,
at module level or inside a function, goes to a lower layer or sideways within a layer, and the
module graph has no cycle. Leaves import nothing of vlcompress but ``errors``.

The layer table lives in docs/design.md, between ``<!-- layers:begin -->`` and
``<!-- layers:end -->``: one row per layer, lowest first (``| N | `mod`, `mod` | ... |``), and a
``Leaves:`` line. This test reads it from there, so the document and the code cannot drift."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import vlcompress

ROOT = Path(vlcompress.__file__).resolve().parent
DESIGN = Path(__file__).resolve().parent.parent / "docs" / "design.md"


def parse_layers(text: str) -> tuple[list[tuple[str, ...]], set[str]]:
    """(layers lowest first, leaves) from the delimited table of docs/design.md. A module is
    named as in the package (``methods.registry``); ``__init__`` is the package itself."""
    m = re.search(r"<!-- layers:begin -->(.*?)<!-- layers:end -->", text, flags=re.S)
    assert m, "docs/design.md has no <!-- layers:begin --> ... <!-- layers:end --> table"
    rows, leaves = [], set()
    for line in m.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0].isdigit():
            assert int(cells[0]) == len(rows), f"layer rows out of order at {line!r}"
            rows.append(tuple("" if n == "__init__" else n
                              for n in re.findall(r"`([\w.]+)`", cells[1])))
        elif line.startswith("Leaves:"):
            leaves = set(re.findall(r"`([\w.]+)`", line))
    assert rows and leaves, "docs/design.md's layer table has no rows or no Leaves: line"
    return rows, leaves


LAYERS, LEAVES = parse_layers(DESIGN.read_text(encoding="utf-8"))


def test_layer_table_parses():
    rows, leaves = parse_layers("x\n<!-- layers:begin -->\n| layer | modules |\n|---:|---|\n"
                                "| 0 | `errors`, `methods.registry` | leaves |\n"
                                "| 1 | `cli`, `__init__` | top |\n"
                                "Leaves: `errors`.\n<!-- layers:end -->")
    assert rows == [("errors", "methods.registry"), ("cli", "")] and leaves == {"errors"}
    assert set(LEAVES) <= {n for names in LAYERS for n in names}


def test_every_module_has_a_layer():
    """Every top-level module and subpackage of vlcompress is in the table (a new module is
    placed in docs/design.md in the same commit)."""
    named = {n.split(".")[0] for names in LAYERS for n in names if n}
    here = {f.stem for f in ROOT.glob("*.py") if f.stem != "__init__"}
    here |= {d.name for d in ROOT.iterdir() if (d / "__init__.py").is_file()}
    assert not sorted(here - named), f"not in docs/design.md's layer table: {sorted(here - named)}"
    assert not sorted(named - here), f"in docs/design.md's layer table but not in vlcompress/: " \
                                     f"{sorted(named - here)}"


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
    assert best is not None, f"module {module} has no layer in docs/design.md's table"
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
