"""scripts/coverage.py: the model selection, and real runs of its worker in a separate process."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cov(tmp_path_factory):
    """scripts/coverage.py as a module that its worker processes can import too (by a name that is not `coverage`)."""
    where = tmp_path_factory.mktemp("script")
    (where / "attnsurgeon_coverage_script.py").symlink_to(ROOT / "scripts" / "coverage.py")
    sys.path.insert(0, str(where))
    try:
        yield importlib.import_module("attnsurgeon_coverage_script")
    finally:
        sys.path.remove(str(where))
        sys.modules.pop("attnsurgeon_coverage_script", None)


CATALOGUE = {
    "classification": ["tv:alexnet", "tv:resnet18", "tv:vgg11"],
    "video": ["tv:mc3_18", "tv:r3d_18"],
    "detection": ["tv:fcos_resnet50_fpn"],
    "timm:byobnet": ["timm:resnext26ts"],
    "timm:efficientnet": ["timm:test_efficientnet"],
    "timm:resnet": ["timm:resnet10t"],
}


def test_select_families_and_limit(cov):
    assert cov.select(CATALOGUE) == [(f, s) for f, specs in CATALOGUE.items() for s in specs]
    assert cov.select(CATALOGUE, ["video", "timm:resnet"]) == [
        ("video", "tv:mc3_18"),
        ("video", "tv:r3d_18"),
        ("timm:resnet", "timm:resnet10t"),
    ]
    # --limit: the first N of each torchvision family, the first N timm families
    assert cov.select(CATALOGUE, ["torchvision", "timm"], limit=1) == [
        ("classification", "tv:alexnet"),
        ("video", "tv:mc3_18"),
        ("detection", "tv:fcos_resnet50_fpn"),
        ("timm:byobnet", "timm:resnext26ts"),
    ]
    assert cov.select(CATALOGUE, ["timm:resnet", "timm:byobnet"], limit=1) == [  # named families are kept
        ("timm:byobnet", "timm:resnext26ts"),
        ("timm:resnet", "timm:resnet10t"),
    ]
    assert cov.select(CATALOGUE, ["timm"], limit=2) == [
        ("timm:byobnet", "timm:resnext26ts"),
        ("timm:efficientnet", "timm:test_efficientnet"),
    ]
    with pytest.raises(SystemExit, match="unknown family vidoe"):
        cov.select(CATALOGUE, ["vidoe"])


def test_family_of_resolves_like_attnsurgeon(cov):
    tv = {f: s for f, s in CATALOGUE.items() if not f.startswith("timm:")}
    timm_modules = {"resnet": ["resnet10t", "resnet18"], "vgg": ["vgg11"]}
    assert cov.family_of("r3d_18", tv, timm_modules) == "video"
    assert cov.family_of("vgg11", tv, timm_modules) == "classification"  # torchvision first, as attnsurgeon resolves
    assert cov.family_of("timm:vgg11", tv, timm_modules) == "timm:vgg"
    assert cov.family_of("resnet10t", tv, timm_modules) == "timm:resnet"
    assert cov.family_of("nosuch", tv, timm_modules) == "other"


def test_sample_inputs_follow_the_family(cov):
    (video,) = cov.sample_inputs("video", (3, 4, 32, 32))
    assert video.shape == (1, 3, 4, 32, 32)
    (images,) = cov.sample_inputs("detection", (3, 64, 48))
    assert isinstance(images, list) and images[0].shape == (3, 64, 48)
    assert [x.shape for x in cov.sample_inputs("optical_flow", (3, 64, 64))] == [(1, 3, 64, 64)] * 2


@pytest.mark.slow
def test_worker_runs_in_its_own_process_and_resumes(cov, tmp_path, capsys):
    timm = pytest.importorskip("timm")
    import torch

    # a results file left by an interrupted run: alexnet done, then a torn line
    kept = {"model": "alexnet", "family": "classification", "status": "ok", "reason": None, "seconds": 1.0}
    (tmp_path / "results.jsonl").write_text(json.dumps(kept) + '\n{"model": "resn')
    assert (
        cov.main(
            [
                "--models",
                "resnet18,nosuch_model,alexnet",
                "--input-size",
                "64",
                "--out",
                str(tmp_path),
                "--resume",
                "--only-failures",
                "--markdown",
                str(tmp_path / "cov.md"),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "1 already in" in printed and "running 2" in printed  # alexnet is not run again
    rows = cov.read_rows(tmp_path / "results.jsonl")
    assert rows["alexnet"] == kept

    ok = rows["resnet18"]
    with torch.device("meta"):  # independent reference: timm's hand-written SE-ResNet-18 minus ResNet-18
        delta = sum(p.numel() for p in timm.create_model("seresnet18").parameters()) - sum(
            p.numel() for p in timm.create_model("resnet18").parameters()
        )
    assert (ok["status"], ok["family"], ok["blocks"], ok["insertions"]) == ("ok", "classification", 8, 8)
    assert ok["params_delta"] == delta and ok["input_size"] == [3, 64, 64]
    bad = rows["nosuch_model"]
    assert (bad["status"], bad["family"]) == ("error", "other")
    assert bad["reason"].startswith("unknown model 'nosuch_model'")  # the CLI's own message
    assert "nosuch_model" in printed and "resnet18  ok" not in printed  # --only-failures
    assert "| torchvision classification | 2 | 2 (100.0 %) |" in (tmp_path / "cov.md").read_text()


@pytest.mark.slow  # four child processes: 3-6 s, kept out of the fast subset's two minutes
def test_runner_reports_timeouts_and_crashes(cov):
    runner = cov.Runner(timeout=60, threads=1, input_size=None)
    assert runner.call(divmod, (7, 2), timeout=60) == ("ok", (3, 1))
    assert runner.call(time.sleep, (30,), timeout=0.5) == ("timeout", None)
    assert runner.call(os._exit, (3,), timeout=60) == ("crash", "exit code 3")
    assert runner.call(os.abort, (), timeout=60) == ("crash", "signal 6")


def test_a_stratified_sample_takes_the_smallest_the_median_and_each_other_structure(cov):
    choice = {
        "model": "a",
        "params": 1,
        "sizes": {"a": 1, "b": 2, "c": 3, "d": 4, "e": 5, "big": 500_000_000},
        "structures": {
            "a": "ViT(Attn)",
            "b": "ViT(Attn)",
            "c": "ViT(Attn)",
            "d": "ViT(RopeAttn)",
            "e": "ViT(RopeAttn)",
            "big": "ViT(Other)",
        },
    }
    # sorted by size a..e (big is over the limit): the smallest, the median (c), then the first other structure (d)
    assert cov.sample_family(choice, per_family=3, max_params=120e6) == ["a", "c", "d"]
    assert cov.sample_family(choice, per_family=2, max_params=120e6) == ["a", "c"]
    assert cov.sample_family(choice, per_family=0, max_params=120e6) == ["a", "b", "c", "d", "e"]  # every model
    assert cov.sample_family(choice, per_family=9, max_params=None) == ["a", "c", "d", "big"]
    only_big = {"model": "big", "params": 5e8, "sizes": {"big": 5e8}, "structures": {"big": "X()"}}
    assert cov.sample_family(only_big, per_family=3, max_params=120e6) == ["big"]  # none fits: the smallest
    assert cov.sample_family({"model": "x", "params": None}, per_family=3, max_params=1) == ["x"]  # an old cache


def test_identity_diff_is_relative_and_reads_nested_outputs(cov):
    import torch

    a = torch.tensor([10.0, -20.0])
    assert cov.identity_diff({"x": a, "y": [a]}, {"x": a, "y": [a]}) == 0.0
    assert cov.identity_diff(a + torch.tensor([0.0, 2.0]), a) == pytest.approx(0.1)  # 2 / 20
    assert cov.identity_diff(a, a[:1]) is None  # different shapes: not comparable
    assert cov.identity_diff(torch.ones(2, dtype=torch.long), torch.ones(2, dtype=torch.long)) is None
