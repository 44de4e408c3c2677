"""profile: FLOPs against analytic formulas and fvcore, memory as tensor bytes, the JSON schema,
error paths. Latency figures are checked for shape and sanity only: speed targets live in
benchmarks/, never in timed unit tests."""

import json
import math

import pytest
import torch
from fvcore.nn import FlopCountAnalysis
from torch import nn

import attnsurgeon
from attnsurgeon.profiling import profile
from attnsurgeon.profiling.flops import count_macs

from formulas import cbam_hidden, cbam_macs, eca_kernel, eca_macs, se_hidden, se_macs

FAST = dict(min_run_time=0.05, max_run_time=0.1, input_size=64)


# hidden widths and kernel sizes from the papers' rules as timm rounds them (tests/formulas.py), not read back from
# the blocks
HIDDEN = {c: se_hidden(c) for c in (256, 512)}
ECA_K = {c: eca_kernel(c) for c in (256, 512)}


def test_the_rules_give_the_widths_worked_out_by_hand():
    assert HIDDEN == {c: cbam_hidden(c) for c in (256, 512)} == {256: 16, 512: 32}  # C/16, already multiples of 8
    assert ECA_K == {256: 5, 512: 5}  # k = int((8 + 1) / 2) = 4 -> odd 5; int((9 + 1) / 2) = 5
    assert [se_hidden(c) for c in (8, 64, 200)] == [8, 8, 16]  # at least 8; 12.5 rounds to 16
    assert [cbam_hidden(c) for c in (8, 64, 200)] == [1, 4, 13]  # divisor 1: 0.5 -> 1, 12.5 -> 13
    assert [eca_kernel(c) for c in (4, 64, 1024)] == [3, 3, 5]  # at least 3; int(7/2) = 3; int(11/2) = 5


@pytest.mark.parametrize(
    "attn, macs, params",
    [
        pytest.param(
            "se",
            lambda c, h, w: se_macs(c, h, w, HIDDEN[c]),
            lambda c: 2 * c * HIDDEN[c] + HIDDEN[c] + c,
            marks=pytest.mark.slow,
        ),  # biased fcs
        ("eca", lambda c, h, w: eca_macs(c, h, w, ECA_K[c]), lambda c: ECA_K[c]),  # one bias-free 1-D conv
        pytest.param(
            "cbam",
            lambda c, h, w: cbam_macs(c, h, w, HIDDEN[c], 7),
            lambda c: 2 * c * HIDDEN[c] + 7 * 7 * 2 + 2,
            marks=pytest.mark.slow,
        ),  # + the spatial conv's BN
    ],
)
def test_block_macs_match_the_analytic_formula(attn, macs, params):
    result = profile("resnet18", attn, stages=[3, 4], **FAST)
    resolution = {3: 4, 4: 2}  # 64 px input: layer3 at 4x4, layer4 at 2x2
    assert [i.stage for i in result.insertions] == [3, 3, 4, 4]
    for ins in result.insertions:
        c = {3: 256, 4: 512}[ins.stage]
        h = w = resolution[ins.stage]
        assert ins.macs == macs(c, h, w), ins.module
        assert ins.params == params(c), ins.module


@pytest.mark.slow
def test_breakdown_sums_exactly_to_the_delta_at_every_position():
    for position in ("standard", "pre", "post", "identity", "3x3"):
        r = profile("resnet18", "cbam", position, **FAST)
        assert r.unattributed_macs == 0
        assert sum(i.macs for i in r.insertions) == r.modified.macs - r.base.macs > 0
        assert sum(i.params for i in r.insertions) == r.modified.params - r.base.params


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v3_small", "timm:convnext_atto", "vit_b_16"])
def test_base_macs_agree_with_fvcore_on_the_unmodified_model(name):
    loaded = attnsurgeon.load_model(name)
    size = loaded.input_size if name == "vit_b_16" else (3, 64, 64)
    x = torch.randn(1, *size)
    ours = count_macs(loaded.model, x)
    stock = (
        FlopCountAnalysis(loaded.model.eval(), (x,)).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    )
    assert ours.fvcore_default_macs == stock.total()
    assert ours.macs > stock.total()  # element-wise ops are counted on top
    assert ours.uncounted == {}


@pytest.mark.slow
def test_flops_are_twice_the_macs_and_reported_per_image():
    r = profile("resnet18", "se", batch_sizes=[1, 2], **FAST)
    d = r.to_dict()
    for side in ("base", "modified"):
        assert d[side]["flops"] == 2 * d[side]["macs"]
    assert d["delta"]["macs"] == d["modified"]["macs"] - d["base"]["macs"]
    assert "FLOPs = 2 x MACs" in d["flop_convention"]


class _Allocates(nn.Module):
    """Allocates a known 8 MiB tensor in its forward."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        scratch = torch.ones(2 * 2**20, dtype=torch.float32, device=x.device)  # 8 MiB
        return self.conv(x) + scratch.sum()


def test_cpu_peak_memory_counts_tensor_bytes():
    r = profile(_Allocates(), **FAST)
    step = r.base.memory[1].step_peak_bytes
    assert 8 * 2**20 <= step < 8 * 2**20 + 2**20  # the scratch tensor, plus small activations
    resident = sum(p.numel() * p.element_size() for p in _Allocates().parameters()) + 3 * 64 * 64 * 4
    assert r.base.memory[1].peak_bytes == step + resident


@pytest.mark.slow
def test_training_peak_exceeds_inference_and_se_raises_it():
    inference = profile("resnet18", "se", **FAST)
    train = profile("resnet18", "se", mode="train", **FAST)
    assert train.base.memory[1].peak_bytes > inference.base.memory[1].peak_bytes
    # SE keeps its pooled input, gate and scaled output for backward
    assert train.modified.memory[1].step_peak_bytes > train.base.memory[1].step_peak_bytes


@pytest.mark.slow
def test_the_rewrite_itself_costs_no_memory():
    """Base and modified both run as fx graphs: a tiny ECA can only add memory, never save it."""
    r = profile("resnet18", "eca", **FAST)
    assert r.modified.memory[1].step_peak_bytes >= r.base.memory[1].step_peak_bytes


@pytest.mark.slow
def test_latency_figures_are_sane():
    r = profile("resnet18", "eca", batch_sizes=[1, 3], threads=1, **FAST)
    for fig in (r.base, r.modified):
        for b, lat in fig.latency.items():
            assert lat.median_ms > 0 and lat.iqr_ms >= 0 and lat.runs >= 2
            assert math.isclose(lat.throughput, 1000 * b / lat.median_ms)
    assert r.environment["threads"] == 1


@pytest.mark.slow
def test_json_schema(cli):
    code, out, err = cli(
        "profile",
        "resnet18",
        "--attn",
        "se",
        "--stages",
        "4",
        "--batch-size",
        "1,2",
        "--input-size",
        "64",
        "--min-time",
        "0.05",
        "--max-time",
        "0.1",
        "--json",
    )
    assert code == 0, err
    d = json.loads(out)
    for side in ("base", "modified", "delta"):
        assert {"params", "macs", "flops", "latency_ms", "throughput", "peak_memory_bytes"} <= set(d[side])
        assert set(d[side]["latency_ms"]) == {"1", "2"}  # several batch sizes: keyed by batch size
    assert {"median", "iqr"} <= set(d["base"]["latency_ms"]["1"])
    ci = d["delta_ci"]["latency_ms"]["2"]["median"]  # the paired interval, per batch size
    assert ci["low"] <= d["delta_percent"]["latency_ms"]["2"]["median"] <= ci["high"] and ci["rounds"] >= 6
    assert d["settings"]["device"] == "cpu" and d["settings"]["batch_sizes"] == [1, 2]
    assert {"dtype", "threads", "torch_version", "mode"} <= set(d["settings"])
    assert [i["module"] for i in d["insertions"]] == ["layer4.0.se", "layer4.1.se"]
    assert all({"params", "macs"} <= set(i) for i in d["insertions"])
    code, out, _ = cli("profile", "resnet18", "--input-size", "64", "--min-time", "0.05", "--max-time", "0.1", "--json")
    single = json.loads(out)
    assert single["modified"] is None and set(single["base"]["latency_ms"]) >= {"median", "iqr"}


@pytest.mark.slow
def test_csv_and_markdown_files(cli, tmp_path):
    code, out, err = cli(
        "profile",
        "resnet18",
        "--attn",
        "eca",
        "--input-size",
        "64",
        "--min-time",
        "0.05",
        "--max-time",
        "0.1",
        "--csv",
        tmp_path / "r.csv",
        "--markdown",
        tmp_path / "r.md",
    )
    assert code == 0, err
    rows = (tmp_path / "r.csv").read_text().splitlines()
    assert rows[0] == "model,metric,base,modified,delta,delta_percent,delta_ci_low,delta_ci_high,runtime"
    assert rows[1].startswith("tv:resnet18,params,")
    md = (tmp_path / "r.md").read_text()
    assert "| params |" in md and "| layer1.0.eca | standard |" in md
    assert not list(tmp_path.glob(".*part"))  # no temporary file left behind


@pytest.mark.parametrize(
    "args, message",
    [
        (["--device", "cuda:7" if torch.cuda.is_available() else "cuda"], "device 'cuda"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--dtype", "int8"], "unknown dtype"),
        (["--batch-size", "0"], "batch sizes must be positive"),
        (["--mode", "eval"], "unknown mode"),
        (["--reduction", "8"], "need --attn"),
        (["--csv", "/no/such/folder/r.csv"], "does not exist"),
        (["--target-ci", "0"], "--target-ci must be a positive percentage"),
    ],
)
def test_profile_errors(cli, args, message):
    code, out, err = cli("profile", "resnet18", "--input-size", "64", *args)
    assert code == 2 and message in err and out == "" and "Traceback" not in err


@pytest.mark.slow
def test_no_native_noise_reaches_the_terminal(capfd):
    profile("resnet18", "se", stages=[4], **FAST)
    captured = capfd.readouterr()
    assert "gpuGetDeviceCount" not in captured.err + captured.out
    assert "USDT" not in captured.err + captured.out


@pytest.mark.cuda
def test_cuda_profile_bf16_train():
    r = profile("resnet18", "se", device="cuda", dtype="bfloat16", mode="train", batch_sizes=[8], **FAST)
    assert r.settings.device.startswith("cuda")
    assert r.modified.memory[8].peak_bytes > r.base.memory[8].peak_bytes > 0
    assert r.base.latency[8].median_ms > 0


def test_profiles_defaults_are_stated_once_in_settings():
    """profile()'s keyword defaults and the CLI's shown defaults are Settings' own, not copies that can drift."""
    import inspect

    from attnsurgeon.cli.options import PROFILE_DEFAULTS
    from attnsurgeon.planning.settings import Settings

    s, params = Settings(), inspect.signature(profile).parameters
    for name in ("device", "dtype", "mode", "min_run_time", "max_run_time"):
        assert params[name].default == getattr(s, name), name
    assert list(params["batch_sizes"].default) == s.batch_sizes
    assert PROFILE_DEFAULTS == {
        "device": s.device, "dtype": s.dtype, "batch_size": ",".join(map(str, s.batch_sizes)), "mode": s.mode,
        "min_time": s.min_run_time, "max_time": s.max_run_time,
    }  # fmt: skip
