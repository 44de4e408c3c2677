"""The manual in docs/ builds with warnings as errors, and the README, its front door, points into it.

`mkdocs build --strict` is what .ci/run runs after the test command; here it runs too (where mkdocs
is installed: the `docs` extra), so a stale link or anchor fails the suite, not only CI. The README
is read on GitHub, not built by mkdocs, so its links are checked here: each file exists and each
anchor is a heading of the target whose slug GitHub and mkdocs spell alike.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
ENV = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # mkdocs-material's end-of-life banner


def build(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config), "--site-dir", str(site)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )


@pytest.fixture(scope="module")
def mkdocs():
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")  # the theme mkdocs.yml names


def test_the_docs_build_with_warnings_as_errors(mkdocs, tmp_path):
    done = build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert done.returncode == 0, done.stderr[-3000:]
    for page in DOCS.glob("*.md"):  # every page is built, and its pictures travel with it
        html = tmp_path / "site" / ("index.html" if page.stem == "index" else f"{page.stem}/index.html")
        assert html.is_file(), page.name
        for picture in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page.read_text()):
            assert (tmp_path / "site" / picture).is_file(), (page.name, picture)


def test_a_broken_link_or_anchor_or_a_page_outside_the_nav_fails_the_build(mkdocs, tmp_path):
    """The validation settings really turn these into errors: the same docs with three faults added."""
    shutil.copytree(DOCS, tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    with open(tmp_path / "docs" / "api.md", "a") as f:
        f.write("\nSee [the old page](nowhere.md) and [the old section](blocks.md#no-such-section).\n")
    (tmp_path / "docs" / "orphan.md").write_text("# Not in the nav\n")
    done = build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert done.returncode != 0
    assert "nowhere.md" in done.stderr and "no-such-section" in done.stderr and "orphan.md" in done.stderr, done.stderr


# --------------------------------------------------------------------------- the README's links


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, each space a hyphen."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings(page: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)  # no comments of code blocks
    return [line.lstrip("#").strip() for line in text.splitlines() if re.match(r"#{1,6} ", line)]


def readme_links() -> list[str]:
    text = re.sub(r"^```.*?^```", "", README.read_text(), flags=re.M | re.S)
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+://", t)]


def test_the_readme_links_resolve_on_github_and_in_the_site():
    links = readme_links()
    assert links
    for link in links:
        path, _, anchor = link.partition("#")
        target = (ROOT / path) if path else README
        assert target.is_file(), link
        if not anchor:
            continue
        titles = {github_slug(h): h for h in headings(target)}
        assert anchor in titles, (link, sorted(titles))
        if target.parent == DOCS:  # the site's anchor, as mkdocs' toc extension makes it, is the same
            toc = pytest.importorskip("markdown.extensions.toc")
            plain = re.sub(r"`([^`]*)`", r"\1", titles[anchor])
            assert toc.slugify(plain, "-") == anchor, link


def test_the_readme_is_a_front_door():
    """A few screens, the test command where .ci/run reads it (the docs extra installed), and a link to
    every page of the manual."""
    lines = README.read_text().splitlines()
    assert len(lines) <= 200
    marker = lines.index("<!-- test-command -->")
    assert lines[marker + 1] == "```bash" and "docs" in re.search(r"-e '\.\[([\w,]+)\]'", lines[marker + 2]).group(1)
    pages = {Path(link.partition("#")[0]) for link in readme_links()}
    assert {p.relative_to(ROOT) for p in DOCS.glob("*.md")} <= pages
    assert any(re.search(r"!\[[^\]]*\]\(docs/[\w-]+\.png\)", line) for line in lines)  # one picture


def test_the_install_page_prints_the_readmes_set_up_commands():
    """The set-up lines (and the CPU-only torch) are printed twice (the README on GitHub, the Install page
    in the site): the same."""

    def bash_lines(page):
        return [
            line
            for block in re.findall(r"^```bash\n(.*?)^```", page.read_text(), flags=re.M | re.S)
            for line in block.splitlines()
            if line.startswith("python3 -m venv")
        ]

    readme = bash_lines(README)
    assert len(readme) == 3 and bash_lines(DOCS / "install.md") == readme


def test_the_set_up_says_how_to_install_the_cpu_only_torch():
    """The default install pulls the CUDA torch (6 GB) on a machine without a GPU (issue 29): both pages give
    the CPU pair, torch and torchvision from the same index (a CPU torch with a CUDA torchvision fails to import)."""
    line = "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu"
    for page in (README, DOCS / "install.md"):
        assert line in page.read_text(), page


def test_the_docs_extra_holds_the_theme_the_config_names():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert config["theme"]["name"] == "material" and any(d.startswith("mkdocs-material") for d in extras["docs"])
    assert config.get("strict") is True and set(config["validation"].values()) == {"warn"}  # warn + strict = error
