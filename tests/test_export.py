"""Export: every format round-trips, loads without attnsurgeon, writes atomically, and a saved
model's recipe rebuilds it exactly (or is refused when it does not fit its tensors)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import attnsurgeon
from attnsurgeon import AttnSurgeonError
from attnsurgeon.saving.export import export
from attnsurgeon.saving.saved import RECIPE_KEY, load

CASES = [("resnet18", "se"), ("mobilenet_v3_small", "eca"), ("convnext_tiny", "cbam")]
SIZE = (3, 64, 64)


def _model(name, attn):
    torch.manual_seed(0)
    model, report = attnsurgeon.insert(name, attn, input_size=SIZE)
    return model.eval(), report


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if ".part" in p.name]


@pytest.mark.slow
@pytest.mark.parametrize("name, attn", CASES)
def test_round_trip_every_format(name, attn, tmp_path):
    model, report = _model(name, attn)
    x = torch.randn(3, *SIZE)  # not the export's own sample input
    with torch.no_grad():
        expected = model(x)
    files = {}
    for ext in ("safetensors", "pt2", "onnx", "ts"):
        path = tmp_path / f"m.{ext}"
        written = export(model, path)
        assert written.format == ext and written.size_bytes == path.stat().st_size > 0
        assert written.max_abs_diff <= 1e-4 and written.warnings == []
        assert written.dynamic_batch == (ext != "safetensors")  # safetensors holds no input shape
        files[ext] = path
    rebuilt = load(files["safetensors"])
    assert rebuilt.attnsurgeon_report.plan == report.plan
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    with torch.no_grad():
        assert torch.equal(rebuilt(x), expected)
        assert torch.allclose(torch.export.load(str(files["pt2"])).module()(x), expected, atol=1e-5)
        assert torch.allclose(torch.jit.load(str(files["ts"]))(x), expected, atol=1e-5)  # traced at batch 2
    import onnxruntime as ort

    session = ort.InferenceSession(str(files["onnx"]), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]  # batch 3: the batch is dynamic
    assert torch.allclose(torch.from_numpy(got), expected, atol=1e-4)
    assert _leftovers(tmp_path) == []


@pytest.mark.slow
def test_exported_files_load_where_attnsurgeon_cannot_be_imported(tmp_path):
    model, _ = _model("resnet18", "se")
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        save_file({"x": x, "y": model(x)}, str(tmp_path / "io.safetensors"))
    for ext in ("pt2", "onnx", "ts"):
        export(model, tmp_path / f"m.{ext}", batch_size=2)
    code = f"""
import sys
sys.modules["attnsurgeon"] = None  # any import of attnsurgeon now fails
try:
    import attnsurgeon
    raise SystemExit("attnsurgeon was importable")
except ImportError:
    pass
import torch, onnxruntime
from safetensors.torch import load_file
io = load_file(r"{tmp_path / "io.safetensors"}")
x, y = io["x"], io["y"]
outs = {{
    "pt2": torch.export.load(r"{tmp_path / "m.pt2"}").module()(x),
    "ts": torch.jit.load(r"{tmp_path / "m.ts"}")(x),
}}
s = onnxruntime.InferenceSession(r"{tmp_path / "m.onnx"}", providers=["CPUExecutionProvider"])
outs["onnx"] = torch.from_numpy(s.run(None, {{s.get_inputs()[0].name: x.numpy()}})[0])
print({{k: float((v - y).abs().max()) for k, v in outs.items()}})
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    diffs = eval(result.stdout.strip().splitlines()[-1])
    assert set(diffs) == {"pt2", "ts", "onnx"} and all(d <= 1e-4 for d in diffs.values())


@pytest.mark.slow
def test_safetensors_carries_the_recipe_and_versions(tmp_path):
    model, _ = attnsurgeon.insert(
        "resnet18", "eca", stages=[3, 4], kernel_size=[3, 5], init="identity", input_size=SIZE
    )
    path = tmp_path / "eca.safetensors"
    export(model, path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    recipe = json.loads(meta[RECIPE_KEY])
    assert recipe["model"] == "tv:resnet18" and recipe["input_size"] == list(SIZE)
    assert recipe["insertions"] == [
        {
            "attn": "eca",
            "position": "standard",
            "stages": [3, 4],
            "init": "identity",
            "options": {"kernel_size": [3, 5]},
        }
    ]
    assert set(json.loads(meta["attnsurgeon.versions"])) == {"attnsurgeon", "torch", "torchvision", "timm"}
    rebuilt = load(path)  # identity init rebuilds the 2*sigmoid gates that hold no weights
    x = torch.randn(1, *SIZE)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model.eval()(x))


@pytest.mark.slow
def test_no_overwrite_without_force(tmp_path, cli):
    model, _ = _model("resnet18", "se")
    path = tmp_path / "m.ts"
    path.write_text("keep me")
    with pytest.raises(AttnSurgeonError, match="exists; pass --force"):
        export(model, path)
    assert path.read_text() == "keep me"
    code, out, err = cli("insert", "resnet18", "--input-size", "64", "--out", path)
    assert code == 2 and "--force" in err and path.read_text() == "keep me"
    export(model, path, force=True)
    assert path.stat().st_size > 1000


@pytest.mark.slow
def test_failed_export_leaves_no_file(tmp_path):
    model, _ = _model("resnet18", "se")
    target = tmp_path / "m.onnx"
    with pytest.raises(AttnSurgeonError, match="does not reproduce the model.*nothing was written"):
        export(model, target, tolerance=0.0)  # onnxruntime differs from PyTorch in the last bits
    assert not target.exists() and _leftovers(tmp_path) == []
    old = tmp_path / "old.onnx"
    old.write_text("previous export")
    with pytest.raises(AttnSurgeonError):
        export(model, old, tolerance=0.0, force=True)
    assert old.read_text() == "previous export"  # a failed overwrite keeps the old file


class _Histogram(torch.nn.Module):
    def forward(self, x):
        return x + torch.histc(x, bins=4).sum()


@pytest.mark.slow
def test_an_op_onnx_cannot_export_is_named(tmp_path):
    with pytest.raises(AttnSurgeonError, match=r"ONNX export failed at op aten\.histc"):
        export(_Histogram(), tmp_path / "h.onnx", input_size=(3, 8, 8))
    assert list(tmp_path.iterdir()) == []


def test_unknown_extension_and_missing_onnx_are_refused_before_work(tmp_path, monkeypatch, cli):
    code, _, err = cli("insert", "no_such_model_but_never_loaded", "--out", tmp_path / "m.h5")
    assert code == 2 and "cannot tell the format" in err  # refused before the model name is looked at
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(AttnSurgeonError, match=r"pip install 'attnsurgeon\[onnx\]'"):
        export(torch.nn.Identity(), tmp_path / "m.onnx")


@pytest.mark.slow
def test_recipe_missing_or_mismatched_is_refused(tmp_path):
    model, _ = _model("resnet18", "se")
    good = tmp_path / "good.safetensors"
    export(model, good)
    with safe_open(str(good), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    plain = tmp_path / "plain.safetensors"
    save_file(tensors, str(plain))
    with pytest.raises(AttnSurgeonError, match="has no attnsurgeon recipe"):
        load(plain)
    recipe = json.loads(meta[RECIPE_KEY])
    recipe["insertions"][0]["attn"] = "eca"  # the tensors are SE's
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={**meta, RECIPE_KEY: json.dumps(recipe)})
    with pytest.raises(
        AttnSurgeonError, match=r"recipe in .* does not match its tensors: .*missing keys .*unexpected keys"
    ):
        load(bad)
    recipe["insertions"][0]["attn"] = "sse"
    save_file(tensors, str(bad), metadata={**meta, RECIPE_KEY: json.dumps(recipe)})
    with pytest.raises(AttnSurgeonError, match=r"insertions\[0\]\.attn: unknown attention block 'sse'"):
        load(bad)


@pytest.mark.slow
def test_cli_insert_out_then_export_and_profile_the_saved_file(tmp_path, cli):
    saved = tmp_path / "cbam.safetensors"
    code, out, err = cli(
        "insert", "resnet18", "--attn", "cbam", "--stages", "4", "--input-size", "64", "--out", saved, "--json"
    )
    assert code == 0, err
    data = json.loads(out)
    assert data["export"]["format"] == "safetensors" and data["export"]["max_abs_diff"] == 0
    code, out, err = cli("export", saved, "--out", tmp_path / "cbam.pt2", "--json")  # dynamic by default
    assert code == 0, err
    assert json.loads(out)["checked_batch_sizes"] == [2, 3]
    code, out, err = cli("profile", saved, "--min-time", "0.05", "--max-time", "0.1", "--json")
    assert code == 0, err
    prof = json.loads(out)
    assert prof["model"] == "tv:resnet18" and prof["delta"]["params"] == data["params"]["delta"]
    assert [i["module"] for i in prof["insertions"]] == ["layer4.0.cbam", "layer4.1.cbam"]
    code, _, err = cli("profile", saved, "--attn", "se")
    assert code == 2 and "carries its own insertions" in err


@pytest.mark.slow
def test_files_get_the_usual_permissions(tmp_path):
    model, _ = _model("resnet18", "se")
    umask = os.umask(0)
    os.umask(umask)
    for ext in ("safetensors", "pt2", "ts"):
        path = tmp_path / f"m.{ext}"
        export(model, path)
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, ext


def test_target_mistakes_are_refused(tmp_path):
    model, _ = _model("resnet18", "se")
    with pytest.raises(AttnSurgeonError, match="says safetensors but --format says onnx"):
        export(model, tmp_path / "m.safetensors", format="onnx")
    folder = tmp_path / "adir"
    folder.mkdir()
    for force in (False, True):
        with pytest.raises(AttnSurgeonError, match="is a folder; give a file name"):
            export(model, folder, format="ts", force=force)


def test_an_interrupted_write_leaves_nothing(tmp_path):
    from attnsurgeon.core.files import atomic_path

    with pytest.raises(SystemExit):  # what SIGTERM becomes in the CLI
        with atomic_path(tmp_path / "m.onnx") as tmp:
            tmp.write_bytes(b"half")
            raise SystemExit(143)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_inspect_a_saved_model(tmp_path, cli):
    model, _ = _model("resnet18", "se")
    export(model, tmp_path / "m.safetensors")
    code, out, err = cli("inspect", tmp_path / "m.safetensors", "--input-size", "64", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["model"] == "tv:resnet18" and len(data["existing_attention"]) == 8  # the inserted SE modules


@pytest.mark.slow
def test_load_base_gives_the_saved_base_weights(tmp_path):
    from attnsurgeon.saving.saved import load_base

    model, report = _model("resnet18", "cbam")
    path = tmp_path / "m.safetensors"
    export(model, path)
    base, modified = load_base(path)
    inserted = tuple(f"{i.module}." for i in report.insertions)
    saved = modified.state_dict()
    base_state = base.state_dict()
    assert set(base_state) == {k for k in saved if not k.startswith(inserted)}
    assert all(torch.equal(v, saved[k]) for k, v in base_state.items())


def test_the_api_function_export_is_not_hidden_by_its_submodule():
    """``import attnsurgeon.saving.export`` (the CLI does) must leave ``attnsurgeon.export`` the function."""
    import importlib

    module = importlib.import_module("attnsurgeon.saving.export")
    assert attnsurgeon.export is module.export and callable(attnsurgeon.load)


@pytest.mark.slow
def test_load_model_understands_a_saved_file(tmp_path):
    """One place loads a saved model for every command: the modified model, its base beside it."""
    model, report = attnsurgeon.insert("resnet18", "eca", stages=[4], input_size=SIZE)
    path = tmp_path / "m.safetensors"
    export(model, path)
    loaded = attnsurgeon.load_model(str(path))
    assert loaded.saved == str(path) and loaded.spec == "tv:resnet18" and loaded.input_size == SIZE
    assert loaded.origin == f"torchvision, saved in {path}"
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(loaded.model) - count(loaded.base) == report.params["delta"] == 10
    with pytest.raises(AttnSurgeonError, match="is a file, not a model name: a model saved by attnsurgeon"):
        attnsurgeon.insert(str(path), "se")


# --------------------------------------------------------------------------- the batch: dynamic by default


def _onnx_run(path, x):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.slow
def test_default_onnx_and_ts_run_at_other_batch_sizes(tmp_path):
    model, _ = _model("resnet18", "se")
    for ext in ("onnx", "ts"):
        written = export(model, tmp_path / f"m.{ext}")
        assert written.dynamic_batch and written.checked_batch_sizes == [2, 3] and written.warnings == []
    ts = torch.jit.load(str(tmp_path / "m.ts"))
    for batch in (1, 3):  # neither is the sample batch (2)
        x = torch.randn(batch, *SIZE)
        with torch.no_grad():
            expected = model(x)
            assert torch.allclose(ts(x), expected, atol=1e-5)
        assert torch.allclose(_onnx_run(tmp_path / "m.onnx", x), expected, atol=1e-4)


@pytest.mark.slow
def test_static_batch_writes_a_fixed_batch(tmp_path, cli):
    import onnxruntime as ort

    saved = tmp_path / "se.safetensors"
    export(_model("resnet18", "se")[0], saved)
    code, out, err = cli("export", saved, "--out", tmp_path / "m.onnx", "--static-batch", "--batch-size", "2", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["dynamic_batch"] is False and data["checked_batch_sizes"] == [2] and data["input_shape"] == [2, *SIZE]
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [2, *SIZE]
    with pytest.raises(Exception, match="dimensions"):  # onnxruntime refuses another batch
        session.run(None, {session.get_inputs()[0].name: torch.randn(3, *SIZE).numpy()})
    code, _, err = cli("export", saved, "--out", tmp_path / "d.pt2", "--dynamic-batch", "--json")  # the old flag
    assert code == 0, err


class _OddEven(torch.nn.Module):
    """Eager runs at any batch, but its code branches on the batch size: no single graph holds every batch."""

    def forward(self, x):
        return x * 2 if x.shape[0] % 2 else x + 1


@pytest.mark.parametrize("ext", ["pt2", pytest.param("onnx", marks=pytest.mark.slow), "ts"])  # onnx: 4 s of exporter
def test_a_model_that_fixes_its_batch_falls_back_to_a_static_one(ext, tmp_path):
    path = tmp_path / f"m.{ext}"
    written = export(_OddEven(), path, input_size=(3, 4, 4))
    assert not written.dynamic_batch and written.checked_batch_sizes == [1] and written.input_shape == [1, 3, 4, 4]
    assert len(written.warnings) == 1 and written.warnings[0].startswith("the batch is static (1): ")
    why = {
        "pt2": "the model's code only holds when (batch % 2) == 0",  # torch.export refuses
        "onnx": "does not reproduce the model at batch 3",
        "ts": "does not reproduce the model at batch 3",
    }[ext]
    assert why in written.warnings[0]
    x = torch.randn(1, 3, 4, 4)
    if ext == "onnx":
        got = _onnx_run(path, x)
    elif ext == "pt2":
        got = torch.export.load(str(path)).module()(x)
    else:
        got = torch.jit.load(str(path))(x)
    assert torch.equal(got, x * 2)  # the file works at its batch


def test_the_fallback_warning_is_printed_by_the_cli(tmp_path, cli, monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr("attnsurgeon.saving.saved.load_model", lambda name, **kw: SimpleNamespace(model=_OddEven()))
    code, out, err = cli("export", "oddeven", "--out", tmp_path / "m.ts", "--input-size", "3,4,4")
    assert code == 0, err
    assert "warning: the batch is static (1)" in " ".join(err.split()) and "dynamic batch" not in out


def test_the_format_registry_drives_resolution_and_messages(tmp_path):
    from dataclasses import replace

    from attnsurgeon.saving.export import FORMATS, format_by_extension, resolve_format

    assert list(FORMATS) == ["safetensors", "pt2", "onnx", "ts"]
    assert {ext: f.name for ext, f in format_by_extension().items()} == {
        ".safetensors": "safetensors",
        ".pt2": "pt2",
        ".onnx": "onnx",
        ".ts": "ts",
    }
    with pytest.raises(AttnSurgeonError, match=r"extension '\.h5': use \.safetensors, \.pt2, \.onnx, \.ts or --format"):
        resolve_format(tmp_path / "m.h5")
    with pytest.raises(AttnSurgeonError, match=r"unknown format 'h5' \(choose from safetensors, pt2, onnx, ts\)"):
        resolve_format(tmp_path / "m.bin", "h5")
    extra = replace(FORMATS["ts"], name="torchscript", extensions=(".pt", ".ts2"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(FORMATS, "torchscript", extra)
        assert resolve_format(tmp_path / "m.PT") == "torchscript"  # one new record: a new extension everywhere
        with pytest.raises(AttnSurgeonError, match=r"use \.safetensors, \.pt2, \.onnx, \.ts, \.pt, \.ts2 or"):
            resolve_format(tmp_path / "m.h5")


def test_the_readme_table_lists_every_format():
    import re
    from pathlib import Path

    from attnsurgeon.saving.export import FORMATS

    readme = (Path(__file__).parent.parent / "docs" / "export.md").read_text()  # the formats table
    rows = re.findall(r"^\| `(\.\w+)` \|", readme, re.M)
    assert rows == [ext for f in FORMATS.values() for ext in f.extensions]


class _DetectorLike(torch.nn.Module):
    """Outputs as YOLO's Detect head gives them in eval mode: a tensor beside a dict of a tensor and a list."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y.flatten(2), {"scores": y.sigmoid(), "feats": [y, y.mean((2, 3))]}


def test_torchscript_writes_outputs_it_cannot_type_as_a_flat_tuple_and_says_so(tmp_path):
    model = _DetectorLike().eval()
    written = export(model, tmp_path / "m.ts", input_size=(3, 8, 8))
    assert written.max_abs_diff == 0
    assert any("cannot type the model's outputs" in w and "flat tuple" in w for w in written.warnings)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        flat, want = torch.jit.load(str(tmp_path / "m.ts"))(x), model(x)
    expected = [want[0], want[1]["scores"], *want[1]["feats"]]
    assert len(flat) == 4 and all(torch.allclose(a, b) for a, b in zip(flat, expected, strict=True))
