"""What a new user hits when following the README and the docs pages (issue 22): each test fails without its fix."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

import attnsurgeon
from attnsurgeon import AttnSurgeonError
from attnsurgeon.loading.samples import max_abs_diff

from processes import wait_for_a_row

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore", "COLUMNS": "200"}


# --------------------------------------------------------------------------- 1. export a model built by the user


def test_export_of_a_model_built_from_an_object_is_checked_on_that_object(tmp_path):
    torch.manual_seed(0)
    m = torchvision.models.resnet18()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    gm, report = attnsurgeon.insert(m, attn="se", input_size=(3, 64, 64))
    assert report.model == "object:ResNet"
    written = attnsurgeon.export(gm, tmp_path / "x.safetensors")
    assert written.max_abs_diff == 0.0 and written.format == "safetensors"
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]  # no temporary file left
    # the check rebuilt the recipe on a copy: the user's object keeps its modules and weights
    assert {k: v for k, v in m.state_dict().items()}.keys() == before.keys()
    assert all(torch.equal(m.state_dict()[k], v) for k, v in before.items())
    # what docs/api.md says to do with the file: load it on a fresh object of the same architecture
    loaded = attnsurgeon.load(tmp_path / "x.safetensors", base=torchvision.models.resnet18())
    x = torch.randn(2, 3, 64, 64)
    assert max_abs_diff(loaded(x), gm.eval()(x)) == 0.0
    assert sum(p.numel() for p in loaded.parameters()) == report.params["modified"]
    # without base= the message names the file the user gave and the call to make
    with pytest.raises(AttnSurgeonError, match=r"x\.safetensors' was made from a model object \(ResNet\).*base="):
        attnsurgeon.load(tmp_path / "x.safetensors")


# --------------------------------------------------------------------------- 4. list models takes the prefixes


def test_list_models_takes_the_library_prefixes_and_shows_them(cli):
    import timm

    code, out, err = cli("list", "models", "timm:resnet1*", "--json")
    assert code == 0, err
    assert [(r["name"], r["source"]) for r in json.loads(out)["models"]] == [
        (n, "timm") for n in sorted(timm.list_models("resnet1*"))
    ]
    code, out, err = cli("list", "models", "tv:resnet", "--json")
    tv = sorted(n for n in torchvision.models.list_models() if "resnet" in n)
    assert code == 0 and [(r["name"], r["source"]) for r in json.loads(out)["models"]] == [
        (n, "torchvision") for n in tv
    ]
    # the table names each model as MODEL and --models take it
    code, out, _ = cli("list", "models", "resnet18")
    assert code == 0 and "tv:resnet18" in out and "timm:resnet18 " in out
    # --models 'timm:resnet1*' expands to exactly what the listing shows
    from attnsurgeon.loading.models import expand_models

    assert expand_models("timm:resnet1*") == [f"timm:{n}" for n in sorted(timm.list_models("resnet1*"))]


# --------------------------------------------------------------------------- 3. a folder that holds another sweep

SWEEP = ("sweep", "resnet18", "--input-size", "32", "--min-time", "0.05", "--max-time", "0.1", "--threads", "1")


def test_a_folder_holding_a_different_sweep_says_so_and_resume_is_kept_for_the_same_one(cli, tmp_path, monkeypatch):
    import attnsurgeon.sweeps.runner as sweep_mod

    def stop(jobs, progress):  # the sweep is written down, then stopped before its first row
        raise KeyboardInterrupt
        yield

    monkeypatch.setattr(sweep_mod, "_run_here", stop)
    out = tmp_path / "zoo"
    code, _, err = cli(*SWEEP, "--attn", "se,eca", "--out", out)
    assert code == 130 and (out / "sweep.json").is_file()
    assert "0 finished rows kept" in err and "--resume" in err
    # another sweep in the same folder: named as different, with another --out or --force, not --resume
    code, _, err = cli(*SWEEP, "--attn", "cbam", "--out", out)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "different sweep" in err and "configurations" in err and "another --out" in err and "--force" in err
    assert "--resume" not in err
    code, _, err = cli(*SWEEP, "--attn", "cbam", "--out", out, "--resume")
    assert code == 2 and "different sweep" in err and "another --out" in err
    # the same sweep again: --resume finishes it
    code, _, err = cli(*SWEEP, "--attn", "se,eca", "--out", out)
    assert code == 2 and "already holds a sweep with these arguments (0 rows finished)" in err and "--resume" in err


# --------------------------------------------------------------------------- 6. stopped from outside, not on a terminal


@pytest.mark.slow
def test_a_sweep_killed_outside_a_terminal_has_said_how_far_it_got_and_how_to_finish(tmp_path):
    import signal

    out = tmp_path / "s"
    args = [*SWEEP[:5], "0.5", "--max-time", "1", "--threads", "1", "--attn", "se,eca,cbam", "--out", str(out)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "attnsurgeon.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )  # stderr a pipe, as under `timeout ... > log`
    wait_for_a_row(proc, out / "rows.jsonl")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    kept = len((out / "rows.jsonl").read_text().splitlines())
    assert 1 <= kept < 4
    lines = err.splitlines()
    assert lines[0] == "sweep: 0/4 rows done · measuring base"  # a line per row, as the rows start
    said = [line for line in lines if line.startswith("sweep: ")]
    assert [line.split()[1] for line in said] == [f"{k}/4" for k in range(len(said))] and len(said) - 1 <= kept
    assert lines[-1].startswith(f"interrupted: {kept} finished row") and "--resume" in lines[-1]
    assert (out / "plot.png").is_file()  # the rows that finished are drawn


# --------------------------------------------------------------------------- 9. smaller things


def test_sweep_help_names_the_ray_extra(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # wide enough that Rich does not cut the help text
    code, out, _ = cli("sweep", "--help")
    assert code == 0 and "attnsurgeon[ray]" in " ".join(out.split())  # Rich markup swallowed "[ray]"


def test_the_number_of_blocks_the_readme_and_the_docs_state_is_the_registrys():
    import re

    from attnsurgeon.blocks import REGISTRY

    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    said = {(p.name, int(n)) for p in pages for n in re.findall(r"(?:the|zoo of) (\d+) blocks\b", p.read_text())}
    assert {p for p, _ in said} >= {"README.md", "index.md"}
    assert {n for _, n in said} == {len(REGISTRY)}, said


def test_list_attn_shows_the_flags_as_they_are_typed(cli):
    from attnsurgeon.blocks import REGISTRY
    from attnsurgeon.blocks.options import OPTIONS

    code, out, _ = cli("list", "attn")
    assert code == 0
    simam = next(line for line in out.splitlines() if line.startswith("│ simam"))
    assert "--lambda 0.0001" in simam and "e_lambda" not in out
    for info in REGISTRY.values():  # every option of every block, by the flag the CLI takes
        row = next(line for line in out.splitlines() if line.startswith(f"│ {info.name} "))
        for name in info.options:
            assert OPTIONS[name].flag[2:8] in row, (info.name, name)


@pytest.mark.slow  # inspect and insert on a timm model: 3-6 s, kept out of the fast subset's two minutes
def test_inspect_prints_its_notes_on_stderr_like_insert(cli, tmp_path):
    (tmp_path / "branchy.py").write_text(
        "import torchvision\nfrom torch import nn\n\n\n"
        "class Branchy(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.body = torchvision.models.resnet18(num_classes=4)\n\n"
        "    def forward(self, x):  # branches on the data: only the body traces\n"
        "        return self.body(x) if x.mean() > -100 else -self.body(x)\n\n\n"
        "def build():\n    return Branchy()\n"
    )
    model = f"{tmp_path / 'branchy.py'}:build"
    code, out, err = cli("inspect", model, "--input-size", "32")
    assert code == 0 and "body.layer4.1" in out
    assert "note: Branchy does not trace whole" in err and "note:" not in out
    code, out, err_insert = cli("insert", model, "--input-size", "32", "--attn", "se")
    assert code == 0 and "note: Branchy does not trace whole" in err_insert and "note:" not in out
    # profile says it in the same words: a note, not a warning (issue 29); and keeps it apart in --json
    code, out, err_profile = cli(
        "profile", model, "--input-size", "32", "--attn", "se", "--min-time", "0.01", "--max-time", "0.02"
    )
    assert code == 0 and "note: Branchy does not trace whole" in err_profile and "warning: Branchy" not in err_profile
    data = attnsurgeon.profile(model, attn="se", input_size=(3, 32, 32), min_run_time=0.01, max_run_time=0.02).to_dict()
    assert any("does not trace whole" in n for n in data["notes"])
    assert not any("does not trace whole" in w for w in data["warnings"])


# --------------------------------------------------------------------------- 7. profile --memory-efficient says so


@pytest.mark.slow
def test_profile_memory_efficient_says_it_is_on_and_what_modified_is(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    fast = ("--input-size", "32", "--min-time", "0.02", "--max-time", "0.05", "--threads", "1")
    code, out, err = cli("profile", "timm:seresnet18", "--memory-efficient", *fast)
    assert code == 0, err
    header, *rest = out.splitlines()
    assert header.endswith("· memory-efficient")
    said = " ".join(" ".join(rest).split())
    assert (
        "modified = the same model with its own attention gates" in said and "recomputed in the backward pass" in said
    )
    assert "--mode train measures them" in said  # inference: why base and modified have the same figures
    code, out, err = cli(
        "profile", "resnet18", "--attn", "se", "--memory-efficient", "--mode", "train", "--batch-size", "2", *fast
    )
    assert code == 0, err
    said = " ".join(out.split())
    assert (
        "· memory-efficient" in said
        and "memory-efficient: the inserted blocks" in said
        and "--mode train measures" not in said
    )
    code, out, err = cli("profile", "resnet18", "--attn", "se", "--memory-efficient", "--json", *fast)
    assert code == 0 and json.loads(out)["memory_efficient"] is True
    code, out, _ = cli("profile", "resnet18", "--attn", "se", *fast)
    assert code == 0 and "memory-efficient" not in out


# --------------------------------------------------------------------------- 8. explain on random weights says so


@pytest.mark.slow
def test_explain_without_weights_says_they_are_random(cli, tmp_path):
    pytest.importorskip("pytorch_grad_cam")
    import numpy as np
    from PIL import Image

    image = tmp_path / "cat.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(image)
    code, out, err = cli("explain", "resnet18", "--image", image, "--input-size", "64", "--out", tmp_path / "a")
    assert code == 0, err
    assert "tv:resnet18 has random weights (no --pretrained or --weights)" in " ".join(err.split())
    assert "random weights" in json.loads((tmp_path / "a" / "explain.json").read_text())["notes"][0]
    # with weights given, nothing to warn about
    from safetensors.torch import save_file

    save_file(torchvision.models.resnet18().state_dict(), str(tmp_path / "r18.safetensors"))
    code, out, err = cli(
        "explain",
        "resnet18",
        "--image",
        image,
        "--input-size",
        "64",
        "--weights",
        tmp_path / "r18.safetensors",
        "--out",
        tmp_path / "b",
    )
    assert code == 0 and "random weights" not in err, err


def test_sweep_plot_labels_do_not_collide_where_points_are_close():
    """The SENet reduction sweep's points and two ECA rows with the same params and nearly the same
    latency: every label must overlap no other label and no other point (matplotlib's own extents)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from attnsurgeon.sweeps.runner import draw_plot

    def row(name, params_m, ms):
        return {
            "status": "ok",
            "model": "resnet50",
            "name": name,
            "params": params_m * 1e6,
            "latency_ms": {"median": ms},
            "batch_size": 1,
        }

    rows = [
        row("base", 25.56, 80.0),
        row("r=2", 45.68, 86.0),
        row("r=4", 35.62, 83.1),
        row("r=8", 30.59, 82.4),
        row("r=16", 28.07, 81.9),
        row("r=32", 26.81, 81.7),
        row("eca/standard", 25.56, 80.6),
        row("eca/pre", 25.56, 80.7),
        row("eca/post", 25.56, 80.65),
        row("eca/identity", 25.57, 80.6),
    ]
    fig = draw_plot(rows)
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    labels = [t for t in ax.texts]
    assert sorted(t.get_text() for t in labels) == sorted(r["name"] for r in rows)
    boxes = [t.get_window_extent(renderer) for t in labels]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert not a.overlaps(b), (
                labels[i].get_text(),
                [t.get_text() for t in labels if t.get_window_extent(renderer) is b],
            )
    points = ax.transData.transform([(r["params"] / 1e6, r["latency_ms"]["median"]) for r in rows])
    for t, box in zip(labels, boxes, strict=True):
        for (px, py), r in zip(points, rows, strict=True):
            assert not box.contains(px, py), (t.get_text(), r["name"])  # no label hides a point
        assert ax.get_window_extent(renderer).contains(box.x0, box.y0) and ax.get_window_extent(renderer).contains(
            box.x1, box.y1
        )
    plt.close(fig)


# --------------------------------------------------------------------------- 5. stopping a sweep on Ray


@pytest.mark.slow
def test_stopping_a_ray_sweep_is_quiet_cancels_its_tasks_and_draws_what_finished(tmp_path):
    pytest.importorskip("ray")
    import signal

    out = tmp_path / "r"
    args = [
        "sweep",
        "--models",
        "resnet18,timm:resnet10t",
        "--attn",
        "se,eca,cbam",
        "--input-size",
        "32",
        "--min-time",
        "0.5",
        "--max-time",
        "1",
        "--threads",
        "1",
        "--out",
        str(out),
        "--ray",
        "--ray-cpus",
        "2",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "attnsurgeon.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    wait_for_a_row(proc, out / "rows.jsonl")
    assert proc.poll() is None  # rows are left to measure
    proc.send_signal(signal.SIGTERM)  # what `timeout` and a batch system's time limit send
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    for noise in ("SIGTERM received", "AbslFailureSignalHandler", "Token authentication", "WARNING"):
        assert noise not in err, err  # Ray's native dump and its start-up notices stay out of the terminal
    kept = len((out / "rows.jsonl").read_text().splitlines())
    assert 1 <= kept < 8 and err.splitlines()[-1].startswith(f"interrupted: {kept} finished row")
    assert err.splitlines()[0].startswith("sweep: 0/8 rows done")
    assert (out / "plot.png").read_bytes()[:4] == b"\x89PNG"  # the plot of what finished, as the local sweep draws it
