"""Build benchmarks/data/sentences_{calibration,eval}.txt: real English sentences, offline.

The source is the docstrings of CPython's standard library (written by people, in English;
licence: PSF License Version 2, the same as Python's). We keep prose sentences only (6 to 40
words, starting with a capital letter, ending with a full stop, no code characters), drop
duplicates, shuffle them with a fixed seed and keep the first ``--n``: the first
``--calibration`` to ``sentences_calibration.txt``, the rest to ``sentences_eval.txt``
(disjoint). The files are committed; this script documents how they were made (the exact
sentences depend on the Python version: 3.11 made the committed ones).

    python scripts/make_sentences.py --n 1400 --calibration 400 --out benchmarks/data

Training set for recovery (``--train``): ``sentences_train.txt``, from the same docstrings with
a looser filter (4 to 60 words; parentheses, colons, semicolons and quotes allowed, so more
and more varied sentences: argument descriptions, cross-references, lists in prose), minus
every sentence of the calibration and eval files already there (compared lower-cased), so it
is disjoint from both by construction; the existing two files are not touched:

    python scripts/make_sentences.py --train --out benchmarks/data
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
import random
import re
import sys
import warnings
from pathlib import Path

_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CODE = re.compile(r"[()\[\]{}<>=_`*#|\\/@$%^~:;>]|\.\.|\d{3,}|\bself\b|\bNone\b|\bTrue\b|\bFalse\b")
_SKIP = ("test", "idlelib", "tkinter", "turtle", "antigravity", "this", "lib2to3", "pydoc_data",
         "ensurepip", "venv", "__main__", "xxsubtype", "xxlimited")


def _docstrings():
    names = sorted(m.name for m in pkgutil.iter_modules() if m.module_finder.path.startswith(
        sys.base_prefix) and "site-packages" not in m.module_finder.path)
    for name in names:
        if name.startswith(_SKIP) or name.startswith("_"):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - platform-specific modules
            continue
        yield inspect.getdoc(mod) or ""
        for _, obj in sorted(vars(mod).items()):
            if getattr(obj, "__module__", None) == name and (inspect.isclass(obj) or inspect.isfunction(obj)):
                yield inspect.getdoc(obj) or ""
                if inspect.isclass(obj):
                    for _, meth in sorted(vars(obj).items()):
                        if inspect.isfunction(meth):
                            yield inspect.getdoc(meth) or ""


# the looser filter of the training set: code-looking characters only
_CODE_TRAIN = re.compile(r"[\[\]{}<>=_`*#|\\/@$%^~]|\.\.|\d{3,}|\bself\b|\bNone\b|\bTrue\b|\bFalse\b|\(\)")


def sentences(loose: bool = False):
    """Prose sentences of the standard library's docstrings, each once (lower-cased key);
    ``loose``: the training set's filter (see the module doc)."""
    lo, hi, code = (4, 60, _CODE_TRAIN) if loose else (6, 40, _CODE)
    seen = set()
    for doc in _docstrings():
        for para in re.split(r"\n\s*\n", doc):
            if para.lstrip().startswith((">>>", "-", "*", "+")) or "    " in para:
                continue
            text = " ".join(para.split())
            for s in _SPLIT.split(text):
                words = s.split()
                if not (lo <= len(words) <= hi) or not s[0].isupper() or not s.endswith("."):
                    continue
                if code.search(s) or sum(c.isalpha() for c in s) < 0.75 * len(s):
                    continue
                key = s.lower()
                if key not in seen:
                    seen.add(key)
                    yield s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calibration", type=int, default=400, help="the first N go to calibration")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/data"))
    ap.add_argument("--train", action="store_true",
                    help="write sentences_train.txt (disjoint from the files in --out) instead")
    a = ap.parse_args()
    if a.train:
        taken = set()
        for name in ("sentences_calibration.txt", "sentences_eval.txt"):
            taken |= {x.lower() for x in (a.out / name).read_text(encoding="utf-8").splitlines()}
        pool = sorted(x for x in sentences(loose=True) if x.lower() not in taken)
        random.Random(a.seed).shuffle(pool)
        (a.out / "sentences_train.txt").write_text("\n".join(pool) + "\n", encoding="utf-8")
        print(f"wrote {len(pool)} training sentences to {a.out}/sentences_train.txt (disjoint "
              f"from the {len(taken)} calibration and eval sentences)")
        return
    pool = sorted(sentences())
    random.Random(a.seed).shuffle(pool)
    if len(pool) < a.n:
        raise SystemExit(f"only {len(pool)} sentences found, {a.n} asked")
    a.out.mkdir(parents=True, exist_ok=True)
    calib, ev = pool[: a.calibration], pool[a.calibration: a.n]
    (a.out / "sentences_calibration.txt").write_text("\n".join(calib) + "\n", encoding="utf-8")
    (a.out / "sentences_eval.txt").write_text("\n".join(ev) + "\n", encoding="utf-8")
    print(f"{len(pool)} sentences found; wrote {len(calib)} calibration and {len(ev)} eval "
          f"sentences (disjoint) to {a.out}")


if __name__ == "__main__":
    main()
