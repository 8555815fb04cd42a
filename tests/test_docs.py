"""The docs site builds with `mkdocs build --strict`, and the repository cites only itself.

A strict build fails on any warning: a broken link or anchor, a page missing from the
navigation, a docstring that mkdocstrings cannot parse, a notebook that cannot be rendered.
"""

import glob
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBPACKAGES = ("flows", "models", "discrete", "analysis", "experiments")


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None,
    reason='mkdocs is not installed (pip install ".[docs]")',
)
def test_docs_build_strict(tmp_path):
    site = tmp_path / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (site / "index.html").exists()
    # the API reference rendered each exported object, and every notebook was rendered
    for sub in SUBPACKAGES:
        html = (site / "api" / sub / "index.html").read_text()
        for name in _exports(sub):
            assert f'id="marginflow.{sub}.{name}"' in html, (sub, name)
    for nb in glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")):
        stem = os.path.basename(nb)[: -len(".ipynb")]
        assert (site / "notebooks" / stem / "index.html").exists(), stem
    assert not list(site.rglob("_hooks.py"))


def _exports(sub: str) -> list[str]:
    with open(os.path.join(ROOT, sub, "__init__.py")) as fh:
        return re.findall(r"^from \.\S+ import (\w+) as \1$", fh.read(), flags=re.M)


@pytest.mark.parametrize("sub", SUBPACKAGES)
def test_api_pages_list_every_export(sub):
    with open(os.path.join(ROOT, "docs", "api", f"{sub}.md")) as fh:
        page = fh.read()
    missing = [n for n in _exports(sub) if f"::: marginflow.{sub}.{n}\n" not in page]
    assert not missing, f"docs/api/{sub}.md does not document {missing}"


def _tracked_texts():
    """(path, text) of the repository's own text files: code, docs, notebooks, config."""
    skip = {"build", "dist", ".git", "site", ".venv", "node_modules"}
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in skip and not d.endswith(".egg-info")
                   and (d == ".ci" or not d.startswith("."))]
        for name in files:
            if name.endswith((".py", ".md", ".ipynb", ".toml", ".yml", ".cfg", ".txt")) or (
                os.path.basename(folder) == ".ci"
            ):
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8", errors="replace") as fh:
                    yield os.path.relpath(path, ROOT), fh.read()


def test_no_citations_outside_the_repository():
    notes = re.compile("|".join(["MATH" + r"\.md", "DESIGN" + r"\.md", r"\.\./" + "shared"]))
    here = os.path.relpath(__file__, ROOT)
    hits = [
        f"{path}:{text[: m.start()].count(chr(10)) + 1}"
        for path, text in _tracked_texts() if path != here
        for m in notes.finditer(text)
        if not text[max(0, m.start() - 5) : m.start()].endswith("docs/")
    ]
    assert not hits, f"citations of files outside the repository: {hits}"


def test_math_sections_cited_exist():
    with open(os.path.join(ROOT, "docs", "math.md")) as fh:
        sections = {int(n) for n in re.findall(r"^## (\d+)\. ", fh.read(), flags=re.M)}
    cited = set()
    pattern = re.compile(
        r"docs/math\.md,? (?:sections?|sec\.|§) ?(\d+)(?:\s*(?:-|and|to)\s*(\d+))?"
    )
    for path, text in _tracked_texts():
        if path.endswith(".ipynb"):
            text = json.dumps(json.loads(text))
        for m in pattern.finditer(text):
            lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
            cited |= {(n, path) for n in range(lo, hi + 1)}
    missing = sorted({f"{path}: section {n}" for n, path in cited if n not in sections})
    assert not missing, f"docs/math.md has no such section: {missing}"
    assert sections == set(range(1, max(sections) + 1))


def _github_slug(heading: str) -> str:
    # GitHub's rule: lowercase, drop everything but letters, digits, spaces, '-' and '_',
    # then each space becomes '-' (runs are not collapsed, unlike mkdocs' slugs).
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_anchors_resolve_on_github_too():
    """README says every page reads fine on GitHub: a link's #anchor must be the GitHub
    slug of a heading of its target (mkdocs --strict checks mkdocs' slugs, which differ
    where a heading holds '<->' or '+')."""
    pages = {p: open(os.path.join(ROOT, p)).read()
             for p in ["README.md", *sorted(glob.glob("docs/*.md", root_dir=ROOT))]}
    slugs = {p: {_github_slug(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}
             for p, text in pages.items()}
    bad = []
    for page, text in pages.items():
        for target, anchor in re.findall(r"\]\(([\w./-]*\.md)?#([\w-]+)\)", text):
            path = os.path.normpath(os.path.join(os.path.dirname(page), target)) if target \
                else page
            if path in slugs and anchor not in slugs[path]:
                bad.append(f"{page}: {target}#{anchor}")
    assert not bad, f"anchors GitHub would not find: {bad}"
