"""Text for the second use case, from what is installed here: docstring paragraphs of
installed Python packages, labelled by package (nothing is downloaded).

:func:`doc_paragraphs` reads the packages' source files with :mod:`ast` (nothing is
imported), takes the docstrings of modules, classes and functions, splits them into
paragraphs at blank lines, and keeps prose: at least ``min_words`` words, no section
underlines, doctest prompts or parameter lists. Duplicates (across packages too) are
dropped, and the order is deterministic (sorted files, then a seeded shuffle), so the
same installation gives the same dataset.
"""

from __future__ import annotations

import ast
import importlib.util
import random
import re
from pathlib import Path

__all__ = ["PACKAGES", "doc_paragraphs"]

#: the classes: packages every cdl installation has
PACKAGES = ("numpy", "sklearn", "torch")

_SECTION = re.compile(r"^\s*[-=~^]{3,}\s*$", re.M)
_PARAM = re.compile(r"^\s*\w+\s*:\s*\S", re.M)
_SPACE = re.compile(r"\s+")


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {name!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    except (SyntaxError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node)
            if doc:
                out.append(doc)
    return out


def _prose(paragraph: str, min_words: int) -> str:
    if ">>>" in paragraph or _SECTION.search(paragraph) or _PARAM.match(paragraph) or "::" in paragraph:
        return ""
    text = _SPACE.sub(" ", paragraph).strip()
    words = text.split(" ")
    if len(words) < min_words or sum(w.isalpha() for w in words) < 0.6 * len(words):
        return ""
    return text


def doc_paragraphs(
    packages: tuple[str, ...] = PACKAGES, per_package: int = 800, min_words: int = 12, seed: int = 0
) -> list[tuple[str, str]]:
    """Up to ``per_package`` ``(paragraph, package)`` pairs per package, shuffled (seeded)."""
    seen: set[str] = set()
    taken: dict[str, list[str]] = {p: [] for p in packages}
    for package in packages:
        for path in sorted(_package_dir(package).rglob("*.py")):
            if "tests" in path.parts or "test" in path.parts:
                continue
            for doc in _docstrings(path):
                for para in doc.split("\n\n"):
                    text = _prose(para, min_words)
                    if text and text not in seen:
                        seen.add(text)
                        taken[package].append(text)
            if len(taken[package]) >= 3 * per_package:
                break
    rng = random.Random(seed)
    out = []
    for package, texts in taken.items():
        rng.shuffle(texts)
        out += [(t, package) for t in texts[:per_package]]
    rng.shuffle(out)
    return out
