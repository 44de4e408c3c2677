"""What a new user hits when following the README (issue 22): each test fails without its fix."""

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
from attnsurgeon.samples import max_abs_diff

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
    # what the README says to do with the file: load it on a fresh object of the same architecture
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
    assert [(r["name"], r["source"]) for r in json.loads(out)["models"]] == [(n, "timm") for n in sorted(timm.list_models("resnet1*"))]
    code, out, err = cli("list", "models", "tv:resnet", "--json")
    tv = sorted(n for n in torchvision.models.list_models() if "resnet" in n)
    assert code == 0 and [(r["name"], r["source"]) for r in json.loads(out)["models"]] == [(n, "torchvision") for n in tv]
    # the table names each model as MODEL and --models take it
    code, out, _ = cli("list", "models", "resnet18")
    assert code == 0 and "tv:resnet18" in out and "timm:resnet18 " in out
    # --models 'timm:resnet1*' expands to exactly what the listing shows
    from attnsurgeon.models import expand_models

    assert expand_models("timm:resnet1*") == [f"timm:{n}" for n in sorted(timm.list_models("resnet1*"))]
