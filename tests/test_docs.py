"""The docs are checked against the code: README.md and docs/*.md name only results JSON that
exist, only options the CLI (or the benchmark script they quote) has, link only to files and
headings that exist, and docs/methods.md's table is the method registry. The README's own
commands run in tests/test_readme.py; the layer table of docs/design.md is enforced by
tests/test_layers.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer

from vlcompress.cli import app

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
#: the pages the README promises, one per topic
TOPICS = ("methods", "runtimes", "data", "benchmarks", "serving", "ci", "report", "design")
#: JSON files the docs name that are not results: what the tool writes or reads
ARTEFACTS = {"report.json", "bench-report.json", "prune.json", "recover.json", "quantize.json",
             "vlcompress.json", "vlcompress_triton.json", "vlcompress_manifest.json",
             "classes.json", "config.json", "tokenizer.json", "vocab.json",
             "preprocessor_config.json", "processor_config.json",
             "model.safetensors.index.json", "old.json",
             "sweep.json", "baseline.json", "generation.json", "genai_config.json"}


def _text(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def _prose(text: str) -> str:
    """The text without fenced code blocks (headings and links live outside them)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _id(page: Path) -> str:
    return str(page.relative_to(REPO))


# ------------------------------------------------------------------------- pages and size

def test_every_topic_has_a_page_that_says_what_the_reader_can_do():
    for topic in TOPICS:
        page = REPO / "docs" / f"{topic}.md"
        assert page.is_file(), f"docs/{topic}.md is missing"
        paras = [p for p in _text(page).split("\n\n") if p.strip()]
        assert paras[0].startswith("# "), f"docs/{topic}.md opens with its title"
        assert paras[1].startswith("After reading this page you can"), \
            f"docs/{topic}.md: the first paragraph says what the reader can do after reading it"


def test_readme_is_short_and_links_every_page():
    text = _text(REPO / "README.md")
    assert len(text.splitlines()) <= 250
    for topic in TOPICS:
        assert f"(docs/{topic}.md)" in text, f"README links docs/{topic}.md"


# ----------------------------------------------------------------------------- results JSON

def _json_names(text: str) -> list[tuple[str, str]]:
    """(name, how it was named) of every .json the text names; ``git show COMMIT:path`` names
    a file as it was at that commit and is skipped."""
    out = []
    for m in re.finditer(r"(?<![\w./:<>-])((?:[\w.-]+/)*\w[\w.-]*\.json)(?![\w])", text):
        out.append((m.group(1), text[max(0, m.start() - 40): m.end()]))
    return out


def test_results_json_named_in_the_docs_exist():
    missing = []
    for page in PAGES:
        for name, ctx in _json_names(_text(page)):
            base = name.rsplit("/", 1)[-1]
            if name.startswith("benchmarks/results/") or "/" not in name and base not in ARTEFACTS:
                if not (RESULTS / base).is_file() and not (REPO / name).is_file():
                    missing.append(f"{_id(page)}: {name} ({ctx!r})")
    assert not missing, "results JSON named but not in benchmarks/results/:\n" + "\n".join(missing)


def test_json_names_are_found():
    names = [n for n, _ in _json_names("see `quality.json`, benchmarks/results/a_b.json and "
                                       "`git show 1a2b:benchmarks/results/old_x.json`; "
                                       "captions.jsonl is data")]
    assert names == ["quality.json", "benchmarks/results/a_b.json"]


# ---------------------------------------------------------------------------------- options

def _cli_options() -> dict[str, set[str]]:
    """``{command: its options}`` of the Typer app (``""``: the global ones)."""
    group = typer.main.get_command(app)
    opts = {"": {o for p in group.params for o in (*p.opts, *p.secondary_opts)}}
    for name, cmd in group.commands.items():
        opts[name] = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)
                      if o.startswith("-")} | opts[""] | {"--help"}
    return opts


def _script_options() -> dict[str, set[str]]:
    """``{"benchmarks/x.py": options its source declares}`` for the scripts the docs quote."""
    out = {}
    for f in [*(REPO / "benchmarks").glob("*.py"), *(REPO / "scripts").glob("*")]:
        if f.is_file():
            src = f.read_text(encoding="utf-8")
            opts = set(re.findall(r"(--[a-z0-9][a-z0-9-]*)", src))
            # argparse.BooleanOptionalAction also accepts --no-NAME
            opts |= {"--no-" + o for o in re.findall(
                r"[\"']--([a-z0-9][a-z0-9-]*)[\"'][^\n]*BooleanOptionalAction", src)}
            out[str(f.relative_to(REPO))] = opts
    return out


def _commands(text: str) -> list[str]:
    """Every code span and every line of a code block (continuations joined), each split at
    ``&&`` / ``;`` / ``|`` into the commands it holds."""
    pieces = []
    for block in re.findall(r"^```\w*\n(.*?)^```", text, flags=re.S | re.M):
        pieces += re.sub(r"\s*\\\n\s*", " ", block).splitlines()
    prose = _prose(text)
    pieces += [ln[4:] for ln in prose.splitlines() if ln.startswith("    ")]  # indented code
    pieces += [s.replace("\n", " ") for s in re.findall(r"`([^`]+)`", prose)]
    cmds = []
    for p in pieces:
        p = p.split("  #")[0]
        cmds += [c.strip() for c in re.split(r"&&|;|\|(?!\|)", p) if c.strip()]
    return cmds


OPTION = re.compile(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)")


def test_every_option_the_docs_name_exists():
    cli, scripts = _cli_options(), _script_options()
    everything = set().union(*cli.values(), *scripts.values())
    bad = []
    for page in PAGES:
        for cmd in _commands(_text(page)):
            opts = OPTION.findall(cmd)
            if not opts or re.match(r"(pip|git|python -m pytest|pytest)\b", cmd):
                continue  # other tools' options
            m = re.search(r"\bvlcompress ([a-z-]+)", cmd)
            s = re.search(r"((?:benchmarks|scripts)/[\w.-]+)", cmd)
            if m and m.group(1) in cli:
                allowed, where = cli[m.group(1)], f"vlcompress {m.group(1)}"
            elif s and s.group(1) in scripts:
                allowed, where = scripts[s.group(1)], s.group(1)
            else:
                allowed, where = everything, "any command or script"
            bad += [f"{_id(page)}: {o} is not an option of {where} (in {cmd!r})"
                    for o in opts if o not in allowed]
    assert not bad, "\n".join(bad)


def test_a_wrong_option_is_caught():
    cli = _cli_options()
    cmds = _commands("run `vlcompress bench RUN --no-such-flag` then\n```bash\n"
                     "vlcompress prune-export \\\n  --method wanda\n```\n")
    assert "vlcompress bench RUN --no-such-flag" in cmds
    assert "vlcompress prune-export --method wanda" in cmds
    assert "--no-such-flag" not in cli["bench"] and "--method" in cli["prune-export"]


# ------------------------------------------------------------------------- methods table

def test_methods_table_is_the_registry():
    """Every row of docs/methods.md's table is what the registry declares, and every
    registered method has a row (a new method is documented where users look for it)."""
    from vlcompress.methods import methods

    want = {m.name: f"| `{m.name}` | {m.kind} | {m.pattern_names} | {', '.join(m.needs) or '-'} | "
            f"{', '.join(m.families) if m.families else 'any'} |" for m in methods()}
    text = _text(REPO / "docs" / "methods.md")
    got = {ln.split("`")[1]: ln for ln in text.splitlines()
           if ln.startswith("| `") and ln.count("|") == 6}
    assert sorted(got) == sorted(want), "docs/methods.md's table and the registry differ"
    for name, line in got.items():
        assert line == want[name]
    for name in want:  # one section per method
        assert re.search(rf"^### {re.escape(name)}$", text, flags=re.M), \
            f"docs/methods.md has no section '### {name}'"


# --------------------------------------------------------------------------------- links

def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    h = re.sub(r"[`*]", "", heading.strip().lower())
    h = re.sub(r"[^\w\- ]", "", h)
    return h.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for h in re.findall(r"^#{1,6} (.+)$", _prose(_text(page)), flags=re.M):
        s = _slug(h)
        out.add(s if s not in seen else f"{s}-{seen[s]}")
        seen[s] = seen.get(s, 0) + 1
    return out


def test_slug_is_githubs():
    assert _slug("Recovery by distillation, UPop, EfficientVLM") == \
        "recovery-by-distillation-upop-efficientvlm"
    assert _slug("GPU first contact (H200)") == "gpu-first-contact-h200"
    assert _slug("`--target-speedup`: the measured search") == "--target-speedup-the-measured-search"


def test_relative_links_resolve():
    bad = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", _prose(_text(page))):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                bad.append(f"{_id(page)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                bad.append(f"{_id(page)}: {target} (no heading #{anchor} in {dest.name})")
    assert not bad, "\n".join(bad)


# --------------------------------------------------------------------------------- report

@pytest.mark.parametrize("extra", ["data", "quantize", "target_speedup", "bench", "gate"])
def test_report_sections_are_documented(extra):
    from vlcompress.report import build_report

    keys = list(build_report(model={}, prune={}, export={}, accuracy=None, latency=[], env={},
                             config={})) + [extra]
    text = _text(REPO / "docs" / "report.md")
    for k in keys:
        assert f"`{k}`" in text, f"docs/report.md does not document report.json's {k!r}"
