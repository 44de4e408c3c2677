"""Every `attnsurgeon` command in the README and the docs pages runs as printed (issue 22).

The commands are read from the ```bash blocks of the README, then of the docs pages in the order of
mkdocs.yml's nav (the order a reader follows). Every one must parse (its options exist, its values
have the right type); the quick ones are run, in order, in one scratch folder as a new user would
run them, and must exit 0 — a command printed on several pages runs once, where it first appears. A
command is left out of the run only for a reason listed in :data:`NOT_RUN` (it needs the network,
files the user brings, a cluster, or minutes of timing); those still parse, and their pre-flight
checks (names, stages, folders) are covered by their own tests. Two sweeps never share a folder
unless the second resumes the first.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"


def documented_pages() -> list[Path]:
    """The README, the docs pages in nav order, then any page the nav leaves out (mkdocs refuses those too)."""
    import yaml

    def flatten(nav):
        for entry in nav:
            value = next(iter(entry.values())) if isinstance(entry, dict) else entry
            yield from flatten(value) if isinstance(value, list) else [DOCS / value]

    nav = list(flatten(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]))
    return [README, *nav, *sorted(set(DOCS.glob("*.md")) - set(nav))]


def page_commands(page: Path) -> list[tuple[str, list[str]]]:
    """(page:line, argv after `attnsurgeon`) for each command in the page's bash blocks."""
    commands, block, pending, start = [], False, "", 0
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if line.startswith("```"):
            block = line.strip() == "```bash"
            continue
        if not block:
            continue
        if not pending:
            start = number
        pending += line.rstrip("\\").rstrip() + " " if line.rstrip().endswith("\\") else line
        if line.rstrip().endswith("\\"):
            continue
        text, pending = pending, ""
        for part in re.split(r"&&|;", text):
            argv = shlex.split(part, comments=True)
            if argv and Path(argv[0]).name == "attnsurgeon":
                commands.append((f"{page.relative_to(ROOT)}:{start}", argv[1:]))
    return commands


PAGES = documented_pages()
COMMANDS = [command for page in PAGES for command in page_commands(page)]

# Why a command is parsed but not run; the first matching rule wins. Everything else runs.
NOT_RUN = [
    (lambda a: "--pretrained" in a, "downloads published weights"),
    (
        lambda a: any(
            f in a
            for f in (
                "cat.jpg",
                "my_audio.py:build",
                "yolo.py:build",
                "output/train/model_best.pth.tar",
                "yolo:runs/detect/train/weights/best.pt",
            )
        ),
        "needs a file the user brings",
    ),
    (
        lambda a: any("gate.py:Gate" in x or x.startswith("gate50.") for x in a),
        "needs the page's gate.py (tests/test_own_block.py writes it and runs these)",
    ),
    (lambda a: "--ray" in a or "cuda" in a, "needs a Ray cluster or a GPU"),
    (lambda a: a[0] in ("sweep", "profile") or "--profile" in a, "times models for minutes"),
    (
        lambda a: any(m in a for m in ("maskrcnn_resnet50_fpn", "retinanet_resnet50_fpn")),
        "runs a detector at 800 px to record its parts' inputs (a minute on 2 cores)",
    ),
    (lambda a: a[0] == "export" and any(x.endswith(".onnx") for x in a), "the ONNX export of ResNet-50 takes a minute"),
]


def why_not_run(argv: list[str]) -> str | None:
    return next((why for rule, why in NOT_RUN if rule(argv)), None)


def test_the_readme_has_its_commands():
    names = {argv[0] for _, argv in COMMANDS}
    assert len(COMMANDS) >= 50 and names >= {
        "insert",
        "inspect",
        "profile",
        "sweep",
        "export",
        "list",
        "apply",
        "explain",
    }
    assert sum(why_not_run(argv) is None for _, argv in COMMANDS) >= 25  # most of them really run
    assert len(RUN) >= 25  # ... counted once each
    assert set(PAGES) == {README, *DOCS.glob("*.md")} and len(PAGES) == len(set(PAGES))  # every page, once
    readme = {argv[0] for place, argv in COMMANDS if place.startswith("README.md:")}
    assert readme >= {
        "insert",
        "inspect",
        "profile",
        "sweep",
        "list",
        "apply",
        "explain",
    }  # the front door shows the main ones


@pytest.mark.parametrize("place,argv", COMMANDS, ids=[place for place, _ in COMMANDS])
def test_every_command_parses(place, argv, cli, monkeypatch):
    """Its subcommand and options exist and its values have their types: the command line is parsed
    by the real CLI, whose commands are swapped for ones that only record that they were called."""
    import functools

    from attnsurgeon import cli as cli_mod

    called = []
    infos = cli_mod.app.registered_commands + [
        c for g in cli_mod.app.registered_groups for c in g.typer_instance.registered_commands
    ]
    for info in infos:

        def record(*args, _name=info.callback.__name__, **kwargs):
            called.append(_name)

        monkeypatch.setattr(info, "callback", functools.wraps(info.callback)(record))
    code, _, err = cli(*cli_mod._optional_ray_address(argv))
    assert code == 0 and len(called) == 1, f"{place}: attnsurgeon {' '.join(argv)}\n{err}"


def test_no_two_sweeps_share_a_folder_unless_one_resumes_the_other():
    seen: dict[str, list[str]] = {}
    shown: set[tuple[str, ...]] = set()
    for place, argv in COMMANDS:
        if argv[0] != "sweep" or tuple(argv) in shown:  # the same command on another page is the same sweep
            continue
        shown.add(tuple(argv))
        out = argv[argv.index("--out") + 1]
        args = [a for a in argv if a != "--resume"]
        if out in seen:
            assert "--resume" in argv and seen[out] == args, f"{place}: another sweep already writes {out}"
        seen[out] = args


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """One folder for every command, as a new user's: the shipped recipes beside it."""
    folder = tmp_path_factory.mktemp("readme")
    (folder / "recipes").symlink_to(ROOT / "recipes")
    return folder


RUN = [
    (place, argv)
    for i, (place, argv) in enumerate(COMMANDS)
    if why_not_run(argv) is None and argv not in [a for _, a in COMMANDS[:i]]
]  # once, where it first appears


@pytest.mark.slow
@pytest.mark.parametrize("place,argv", RUN, ids=[place for place, _ in RUN])
def test_the_quick_commands_run_as_printed(place, argv, scratch, cli, monkeypatch):
    from attnsurgeon import cli as cli_mod

    monkeypatch.chdir(scratch)
    code, out, err = cli(*cli_mod._optional_ray_address(argv))
    assert code == 0, f"{place}: attnsurgeon {' '.join(argv)}\n{err[-2000:]}"
