"""profile --runtime: rows per runtime, the output check against eager, and the refusals. Outputs are compared
with eager's own; latency figures are checked for presence only (the 5 % agreement with a direct
InferenceSession.run loop is benchmarks/runtime_accuracy.py)."""

import json
import sys
import textwrap

import pytest
import torch
from torch import nn

from attnsurgeon.profiling import profile
from attnsurgeon.profiling.runtimes import RUNTIMES, TOLERANCE, Loaded, Runtime

FAST = dict(min_run_time=0.02, max_run_time=0.05, threads=1)
SIZE = (3, 16, 16)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


class _Histogram(nn.Module):  # aten.histc has no ONNX export; TorchScript traces it
    def forward(self, x):
        return x + torch.histc(x, bins=4).sum()


def _by_label(result):
    return {r.label: r for r in result.runtimes}


def _off_by_one(model, exports, name, settings, precision):
    """A runtime that computes the wrong thing: eager's outputs plus one."""

    def run(*x):
        with torch.no_grad():
            return [model(*x) + 1]

    return Loaded(run, lambda x: lambda: run(*x))


def test_a_runtime_whose_outputs_differ_is_not_timed_and_the_others_are(monkeypatch):
    monkeypatch.setitem(RUNTIMES, "wrong", Runtime("wrong", "Wrong", _off_by_one))
    result = profile(_Tiny(), input_size=SIZE, runtimes=["eager", "wrong"], **FAST)
    rows = _by_label(result)
    assert list(rows) == ["eager", "wrong"]
    assert rows["eager"].error is None and rows["eager"].base.latency[1].median_ms > 0
    assert "base outputs differ from eager at batch 1: max abs diff 1" in rows["wrong"].error
    assert rows["wrong"].base is None and rows["wrong"].max_abs_diff["base"] == pytest.approx(1.0)
    as_json = result.to_dict()["runtimes"]
    assert [(r["runtime"], r["status"]) for r in as_json] == [("eager", "ok"), ("wrong", "failed")]


def test_torchscript_rows_are_checked_against_eager():
    result = profile(_Tiny(), input_size=SIZE, runtimes=["torchscript"], batch_sizes=[1, 2], **FAST)
    row = _by_label(result)["torchscript"]
    assert row.error is None, row.error
    assert row.max_abs_diff["base"] <= TOLERANCE
    assert set(row.base.latency) == {1, 2} and set(row.base.memory) == {1, 2}  # torch's allocator: memory too
    assert result.base.latency == {}  # eager was not asked for: not timed


def test_onnxruntime_row_of_a_small_model():
    result = profile(_Tiny(), input_size=SIZE, runtimes=["onnxruntime"], **FAST)
    row = _by_label(result)["onnxruntime"]
    assert row.error is None, row.error
    assert row.max_abs_diff["base"] <= TOLERANCE and row.base.latency[1].median_ms > 0
    assert result.to_dict()["settings"]["runtimes"] == ["onnxruntime"]


@pytest.mark.slow
def test_onnxruntime_rows_base_and_modified(cli):
    code, out, err = cli(
        "profile",
        "resnet18",
        "--attn",
        "se",
        "--runtime",
        "eager,onnxruntime",
        "--input-size",
        "32",
        "--min-time",
        "0.02",
        "--max-time",
        "0.05",
        "--threads",
        "1",
        "--json",
    )
    assert code == 0, err
    rows = json.loads(out)["runtimes"]
    assert [r["runtime"] for r in rows] == ["eager", "onnxruntime"]
    ort = rows[1]
    assert ort["status"] == "ok" and set(ort["output_check"]["max_abs_diff"]) == {"base", "modified"}
    assert max(ort["output_check"]["max_abs_diff"].values()) <= TOLERANCE * ort["output_check"]["output_scale"]
    for key in ("base", "modified"):
        assert ort[key]["latency_ms"]["median"] > 0
    assert ort["delta"]["latency_ms"]["median"] == pytest.approx(
        ort["modified"]["latency_ms"]["median"] - ort["base"]["latency_ms"]["median"], abs=1e-3
    )
    assert ort["base"].get("peak_memory_bytes") is None  # ONNX Runtime reports none: "-"


def test_a_missing_package_is_one_line_naming_the_extra_and_eager_is_still_printed(cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)
    code, out, err = cli(
        "profile",
        "resnet18",
        "--runtime",
        "eager,openvino",
        "--input-size",
        "32",
        "--min-time",
        "0.02",
        "--max-time",
        "0.05",
        "--threads",
        "1",
    )
    assert code == 0, err
    assert "openvino: OpenVINO needs the openvino package: pip install 'attnsurgeon[openvino]'" in out
    assert "│ eager" in out and "latency (bs=1)" in out
    assert "Traceback" not in out + err


@pytest.mark.slow
def test_a_model_that_does_not_export_says_why_and_torchscript_still_runs():
    result = profile(_Histogram(), input_size=(3, 8, 8), runtimes=["onnxruntime", "torchscript"], **FAST)
    rows = _by_label(result)
    assert "ONNX export failed at op aten.histc" in rows["onnxruntime"].error
    assert rows["torchscript"].error is None and rows["torchscript"].base.latency[1].median_ms > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--runtime", "tensorflow"], "unknown runtime 'tensorflow': choose from eager, compile"),
        (["--runtime", "onnxruntime", "--mode", "train"], "--mode train is measured in eager PyTorch only"),
        (["--runtime", "onnxruntime", "--dtype", "bf16"], "--dtype bfloat16 is measured in eager PyTorch only"),
        (["--runtime", "eager,openvino", "--quantize", "int8"], "add onnxruntime to --runtime"),
        (["--runtime", "onnxruntime", "--quantize", "int4"], "unknown --quantize 'int4'"),
    ],
)
def test_refused_in_one_line_before_work(cli, args, message):
    code, out, err = cli("profile", "resnet18", "--input-size", "32", *args)
    assert code != 0 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_csv_and_markdown_carry_the_runtime(tmp_path):
    from attnsurgeon.profiling.report import to_csv, to_markdown

    result = profile(_Tiny(), input_size=SIZE, runtimes=["eager", "torchscript"], **FAST)
    lines = to_csv(result).splitlines()
    assert lines[0].endswith(",runtime")
    assert [line.split(",")[1] for line in lines if line.endswith(",torchscript")] == [
        "latency_ms.median (bs=1)",
        "latency_ms.iqr (bs=1)",
        "throughput (bs=1)",
        "peak_memory_bytes (bs=1)",
    ]
    assert "| torchscript | latency (bs=1) |" in to_markdown(result)


@pytest.mark.slow
def test_int8_rows_and_their_error_on_resnet18_se(cli):
    args = ["profile", "resnet18", "--attn", "se", "--runtime", "onnxruntime", "--quantize", "int8"]
    args += ["--input-size", "64", "--min-time", "0.02", "--max-time", "0.05", "--threads", "1"]
    code, out, err = cli(*args, "--json")
    assert code == 0, err
    rows = {(r["runtime"], r["precision"]): r for r in json.loads(out)["runtimes"]}
    floats, ints = rows[("onnxruntime", "float32")], rows[("onnxruntime", "int8")]
    assert floats["status"] == ints["status"] == "ok"
    scale = ints["output_check"]["output_scale"]
    for model in ("base", "modified"):
        error = ints["output_check"]["max_abs_diff"][model]
        # quantized: visibly off its float self, yet the same function (an int8 model is not a random one)
        assert floats["output_check"]["max_abs_diff"][model] * 100 < error < 0.5 * scale
        assert ints[model]["latency_ms"]["median"] > 0
    code, out, err = cli(*args)  # the table, as people read it
    assert "onnxruntime int8 output error against the float model: base max abs diff" in out


@pytest.mark.slow
def test_openvino_rows_are_checked_against_eager():
    pytest.importorskip("openvino")
    result = profile(_Tiny(), input_size=SIZE, runtimes=["openvino"], **FAST)
    row = _by_label(result)["openvino"]
    assert row.error is None, row.error
    assert row.max_abs_diff["base"] <= TOLERANCE and row.base.latency[1].median_ms > 0


@pytest.mark.slow
def test_compile_rows_are_checked_against_eager():
    result = profile(_Tiny(), input_size=SIZE, runtimes=["compile"], **FAST)
    row = _by_label(result)["compile"]
    assert row.error is None, row.error
    assert row.max_abs_diff["base"] <= TOLERANCE and row.base.latency[1].median_ms > 0


@pytest.mark.slow
def test_a_sweep_takes_the_runtime_as_a_grid_axis(cli, tmp_path):
    code, out, err = cli(
        "sweep",
        "resnet18",
        "--attn",
        "se",
        "--runtime",
        "eager,torchscript",
        "--input-size",
        "32",
        "--min-time",
        "0.02",
        "--max-time",
        "0.05",
        "--threads",
        "1",
        "--out",
        tmp_path / "s",
        "--json",
    )
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(out)["rows"]}
    assert list(rows) == ["base@eager", "se@eager", "base@torchscript", "se@torchscript"]
    assert all(r["status"] == "ok" for r in rows.values())
    assert rows["se@torchscript"]["runtime"] == "torchscript" and "runtime" not in rows["se@eager"]
    assert rows["se@torchscript"]["delta"]["params"] == rows["se@eager"]["delta"]["params"] > 0  # counts: the model's
    assert rows["se@torchscript"]["latency_ms"]["median"] > 0


@pytest.mark.slow  # two refused exports, 24 s: the fast subset checks quiet_torch_warnings alone (below)
def test_a_model_that_does_not_export_is_one_line_not_the_exporters_graph_dump(tmp_path):
    """A size taken from the data (.item()): torch.export refuses it, and torch prints the graph it had (three
    times, 50 lines here; thousands for a detector) as it does. export and profile --runtime say it in one line."""
    import subprocess

    script = textwrap.dedent("""
        import torch, attnsurgeon
        from torch import nn

        class Gate(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 8, 3, padding=1)

            def forward(self, x):
                y = self.conv(x)
                n = int((y > 0).sum().item() > 0) + 1
                return y.reshape(y.shape[0], -1)[:, : n * 4]

        try:
            attnsurgeon.export(Gate().eval(), "m.onnx", input_size=(3, 8, 8))
        except attnsurgeon.AttnSurgeonError as exc:
            print("export:", exc)
        r = attnsurgeon.profile(Gate().eval(), input_size=(3, 8, 8), runtimes=["eager", "onnxruntime"], threads=1,
                                min_run_time=0.01, max_run_time=0.05)
        print("profile:", [(x.runtime, x.error) for x in r.runtimes])
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    export_line, profile_line = done.stdout.strip().splitlines()[-2:]
    assert export_line.startswith("export: ONNX export failed: GuardOnDataDependentSymNode")
    assert "('eager', None)" in profile_line and "('onnxruntime', 'base model: ONNX export failed" in profile_line
    assert not (tmp_path / "m.onnx").exists()
    assert "def forward" not in done.stderr and len(done.stderr.splitlines()) < 5, done.stderr[:3000]


@pytest.mark.slow
def test_yolov8n_in_a_sweep_exports_after_its_eager_rows(cli, tmp_path):
    """The eager rows run the model first, and its Detect head caches its anchors on itself; the ONNX rows
    failed on them ('Could not guard on data-dependent expression Eq(u0, 1)') until each row started from the
    model as built."""
    pytest.importorskip("ultralytics")
    code, out, err = cli(
        "sweep", "yolo:yolov8n", "--attn", "se", "--runtime", "eager,onnxruntime", "--min-time", "0.02",
        "--max-time", "0.05", "--threads", "1", "--out", tmp_path / "s", "--json",
    )  # fmt: skip
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(out)["rows"]}
    assert list(rows) == ["base@eager", "se@eager", "base@onnxruntime", "se@onnxruntime"]
    assert all(r["status"] == "ok" for r in rows.values()), {n: r.get("error") for n, r in rows.items()}


def test_quiet_torch_warnings_drops_what_code_prints_and_torch_logs_then_restores_the_levels(capfd):
    """What keeps the exporters' graph dumps off the terminal (the slow test above shows it on a real refusal)."""
    import logging

    from attnsurgeon.core.native import quiet_torch_warnings

    logger = logging.getLogger("torch.export")
    before = logger.level
    with quiet_torch_warnings():
        print("def forward(self, x): ...")
        print("graph dump", file=sys.stderr)
        logger.warning("a recompile")
        assert logger.level == logging.ERROR
    print("after")
    out, err = capfd.readouterr()
    assert out == "after\n" and "graph dump" not in err and "a recompile" not in err
    assert logger.level == before
