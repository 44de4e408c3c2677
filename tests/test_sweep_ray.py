"""Zoo sweeps (--models) and sweeps on Ray (--ray): the same rows as the local sweep, rows kept when
the driver is killed, failing tasks as failed rows, the clear error without Ray.

The Ray tests share one small local Ray instance (2 CPUs, no dashboard) and skip where Ray is not
installed; everything else runs without Ray."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torchvision

from attnsurgeon import AttnSurgeonError
from attnsurgeon.loading.models import expand_models
from attnsurgeon.planning.recipes import parse_recipe
from attnsurgeon.sweeps import runner as sweep_mod
from attnsurgeon.sweeps.runner import run_sweep

from processes import wait_for_a_row

ROOT = Path(__file__).resolve().parent.parent
FAST = {"min_run_time": 0.05, "max_run_time": 0.1, "threads": 1}
CONFIGS = parse_recipe({"model": "resnet18", "grid": {"attn": ["se", "eca"]}}).configurations
COMPARED = ("model", "name", "status", "params", "macs", "insertions")


def same_figures(row):
    """What must not depend on where a row ran: everything but the timings."""
    return (
        {k: row.get(k) for k in COMPARED},
        row.get("base", {}).get("params"),
        row.get("delta", {}).get("params"),
        row.get("delta", {}).get("macs"),
    )


# --------------------------------------------------------------------------- zoo sweeps (no Ray)


def test_model_globs_expand_through_the_libraries_listings():
    # independent reference: the libraries' own listings
    assert expand_models("timm:resnet1*") == [f"timm:{n}" for n in sorted(timm.list_models("resnet1*"))]
    tv = sorted(n for n in torchvision.models.list_models() if n.startswith("resnet"))
    assert expand_models(["tv:resnet*", "resnet18", "tv:resnet18"]) == [f"tv:{n}" for n in tv] + ["resnet18"]
    with pytest.raises(AttnSurgeonError, match="matches no model"):
        expand_models("timm:nosuchnet*")
    with pytest.raises(AttnSurgeonError, match="unknown model 'resnet1B'"):
        expand_models("resnet18,resnet1B")


@pytest.mark.slow
def test_zoo_sweep_crosses_models_with_configurations_and_groups_by_model(tmp_path):
    """Run in a fresh interpreter: a local sweep never imports Ray."""
    out = tmp_path / "zoo"
    code = (
        f"import sys, json; from attnsurgeon.cli import main; sys.argv = ['attnsurgeon', 'sweep', '--models', "
        f"'resnet18,timm:resnet10t', '--attn', 'se,eca', '--input-size', '32', '--min-time', '0.05', "
        f"'--max-time', '0.1', '--threads', '1', '--out', {str(out)!r}]\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print('RAY_IMPORTED' if 'ray' in sys.modules else 'NO_RAY')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("NO_RAY")
    rows = json.loads((out / "results.json").read_text())
    assert [(r["model"], r["name"]) for r in rows] == [
        (m, n) for m in ("resnet18", "timm:resnet10t") for n in ("base", "se", "eca")
    ]
    assert all(r["status"] == "ok" for r in rows)
    # each model's Δ against its own base: SE's parameters on resnet10t's own widths
    by = {(r["model"], r["name"]): r for r in rows}
    timm_r10 = sum(p.numel() for p in timm.create_model("resnet10t").parameters())
    assert by[("timm:resnet10t", "base")]["params"] == timm_r10 == by[("timm:resnet10t", "se")]["base"]["params"]
    assert by[("resnet18", "se")]["base"]["params"] == sum(
        p.numel() for p in torchvision.models.resnet18().parameters()
    )
    # the table: one per model, titled by it
    assert proc.stdout.index("resnet18 · batch 1") < proc.stdout.index("timm:resnet10t · batch 1")
    csv = (out / "results.csv").read_text().splitlines()
    assert [line.split(",")[:2] for line in csv[1:]] == [
        [m, n] for m in ("resnet18", "timm:resnet10t") for n in ("base", "se", "eca")
    ]


def test_a_recipe_names_several_models(tmp_path):
    spec = parse_recipe({"models": ["timm:resnet1*", "convnext_tiny"], "grid": {"attn": ["se"]}})
    assert spec.models == ["timm:resnet1*", "convnext_tiny"] and spec.to_dict()["models"] == spec.models
    with pytest.raises(AttnSurgeonError, match="'models' belongs to a sweep recipe"):
        parse_recipe({"models": ["resnet18"], "insertions": [{"attn": "se"}]})
    with pytest.raises(AttnSurgeonError, match="not both"):
        parse_recipe({"model": "resnet18", "models": ["resnet34"], "grid": {"attn": ["se"]}})
    with pytest.raises(AttnSurgeonError, match="names several models"):
        run_sweep("timm:resnet1*", CONFIGS, tmp_path / "s", settings=FAST)


def test_ray_without_ray_installed_says_how_to_install_it(cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError, as where it is absent
    code, out, err = cli(
        "sweep", "resnet18", "--attn", "se", "--input-size", "32", "--ray", "local", "--out", tmp_path / "s"
    )
    assert code == 2 and "pip install 'attnsurgeon[ray]'" in err and "Traceback" not in err
    assert not (tmp_path / "s").exists()  # said before anything was written


def test_wrong_zoo_and_ray_arguments_are_one_line_errors(cli, tmp_path):
    for args, message in [
        (["resnet18", "--models", "resnet34"], "give MODEL or --models, not both"),
        (["--attn", "se"], "give a MODEL, a sweep RECIPE, or --models"),
        (["resnet18", "--ray-cpus", "2"], "--ray-cpus sizes a local Ray instance"),
    ]:
        code, _, err = cli("sweep", *args, "--attn", "se", "--out", tmp_path / "s")
        assert code == 2 and message in err and "Traceback" not in err, (args, err)
    assert not (tmp_path / "s").exists()


def test_each_task_asks_for_one_measurements_resources():
    from attnsurgeon.sweeps.runner import task_resources

    assert task_resources({"device": "cpu", "threads": 4}) == (4, 0, {"device": "cpu", "threads": 4})
    assert task_resources({"mode": "train"}) == (1, 0, {"mode": "train", "threads": 1})  # unset: one CPU, one thread
    assert task_resources({"device": "cuda:3", "dtype": "bfloat16"}) == (
        1,
        1,
        {"device": "cuda", "dtype": "bfloat16", "threads": 1},
    )


def test_ray_takes_an_optional_address():
    from attnsurgeon.cli import _optional_ray_address as parse

    assert parse(["sweep", "resnet18", "--ray"]) == ["sweep", "resnet18", "--ray", "local"]
    assert parse(["sweep", "--ray", "resnet18", "--out", "x"]) == ["sweep", "--ray", "local", "resnet18", "--out", "x"]
    assert parse(["sweep", "--ray", "--out", "x"]) == ["sweep", "--ray", "local", "--out", "x"]
    for address in ("auto", "ray://head:10001", "10.0.0.5:6379", "local"):
        assert parse(["sweep", "--ray", address, "m"]) == ["sweep", "--ray", address, "m"]
    assert parse(["sweep", "--ray", "timm:resnet18"])[2:] == ["local", "timm:resnet18"]  # a model, not HOST:PORT


# --------------------------------------------------------------------------- on Ray


@pytest.fixture(scope="module")
def ray_address():
    ray = pytest.importorskip("ray")
    import logging

    context = ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    yield context.address_info["gcs_address"]
    ray.shutdown()


@pytest.mark.slow
def test_ray_sweep_gives_the_local_sweeps_rows(ray_address, tmp_path):
    models = ["resnet18", "timm:resnet10t"]
    local = run_sweep(models, CONFIGS, tmp_path / "local", settings=FAST, input_size=32)
    calls = []
    on_ray = run_sweep(
        models,
        CONFIGS,
        tmp_path / "ray",
        settings=FAST,
        input_size=32,
        ray="local",
        progress=lambda *args: calls.append(args),
    )
    assert [same_figures(r) for r in on_ray.rows] == [same_figures(r) for r in local.rows]
    assert all(r["status"] == "ok" for r in on_ray.rows) and len(on_ray.rows) == 6
    assert sorted(on_ray.measured) == sorted(f"{m}/{n}" for m in models for n in ("base", "se", "eca"))
    # two rows measured at once (2 CPUs, one thread each), and the files as the local sweep writes them
    assert max(c[3] for c in calls) == 2 and calls[-1][1:] == (6, 6, 0)
    assert len((tmp_path / "ray" / "rows.jsonl").read_text().splitlines()) == 6
    local_csv = (tmp_path / "local" / "results.csv").read_text().splitlines()
    ray_csv = (tmp_path / "ray" / "results.csv").read_text().splitlines()
    assert local_csv[0] == ray_csv[0] and [r.split(",")[:5] for r in ray_csv] == [r.split(",")[:5] for r in local_csv]
    assert (tmp_path / "ray" / "plot.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_a_task_that_raises_or_dies_becomes_a_failed_row(ray_address, tmp_path, monkeypatch):
    factory = tmp_path / "broken.py"
    factory.write_text(
        "import os\n\ndef boom():\n    raise RuntimeError('boom in the factory')\n\n"
        "def dies():\n    os._exit(1)  # the worker process dies, as on a lost node\n"
    )
    monkeypatch.setattr(sweep_mod, "RAY_RETRIES", 0)  # no retries: the test need not wait for them
    models = ["resnet18", f"{factory}:boom", f"{factory}:dies"]
    result = run_sweep(models, CONFIGS[:1], tmp_path / "s", settings=FAST, input_size=32, ray="local")
    by = {(r["model"].split(":")[-1], r["name"]): r for r in result.rows}
    assert by[("resnet18", "base")]["status"] == by[("resnet18", "se")]["status"] == "ok"  # the sweep went on
    for name in ("base", "se"):
        assert (
            by[("boom", name)]["status"] == "failed"
            and "RuntimeError: boom in the factory" in by[("boom", name)]["reason"]
        )
        died = by[("dies", name)]
        assert died["status"] == "failed" and died["reason"].startswith("the Ray task failed")
        assert "0 retries" in died["reason"]
    assert by[("dies", "se")]["insertions"][0]["attn"] == "se"  # a failed row still says what it tried
    assert len((tmp_path / "s" / "rows.jsonl").read_text().splitlines()) == 6


@pytest.mark.slow
def test_killing_the_driver_keeps_finished_rows_and_resume_measures_the_rest(ray_address, tmp_path, cli):
    out = tmp_path / "s"
    args = [
        "sweep",
        "resnet18",
        "--attn",
        "se,eca,cbam",
        "--position",
        "standard,pre",
        "--input-size",
        "32",
        "--min-time",
        "0.05",
        "--max-time",
        "0.1",
        "--threads",
        "1",
        "--out",
        str(out),
        "--ray",
        ray_address,
    ]
    proc = subprocess.Popen(
        [sys.executable, "-c", f"import sys; from attnsurgeon.cli import main; sys.argv = {['x'] + args!r}; main()"],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    rows_file = out / "rows.jsonl"
    wait_for_a_row(proc, rows_file)
    assert proc.poll() is None, proc.stderr.read().decode()  # still running: rows are left to measure
    proc.send_signal(signal.SIGKILL)  # no cleanup at all
    proc.wait()
    kept = rows_file.read_text().splitlines()
    assert 1 <= len(kept) < 7
    # resumed here without Ray (a sweep resumes whichever way it ran): the finished rows are not measured again
    code, stdout, err = cli(*args[:-2], "--resume", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    lines = rows_file.read_text().splitlines()
    assert lines[: len(kept)] == kept  # finished rows left exactly as they were
    assert not set(result["measured"]) & {json.loads(line)["name"] for line in kept}
    assert len(lines) == 7 and len(result["measured"]) == 7 - len(kept)
    assert [r["name"] for r in result["rows"]] == [
        "base",
        "se/standard",
        "se/pre",
        "eca/standard",
        "eca/pre",
        "cbam/standard",
        "cbam/pre",
    ]
    assert all(r["status"] == "ok" for r in result["rows"])
