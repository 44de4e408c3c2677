"""Any block by reference (issue 26): a gate file the test writes, timm's factory names, refusals.

The gate of :data:`GATE` is an SE-like channel gate with ``hidden = C // reduction``; its
parameters are ``2·C·hidden + hidden + C`` (two 1×1 convs with biases) and its MACs SE's
(``formulas.se_macs``). Nothing here reads a width back from attnsurgeon.
"""

from __future__ import annotations

import copy
import json
import textwrap

import pytest
import torch

import attnsurgeon
from attnsurgeon import AttnSurgeonError, insert
from attnsurgeon.blocks import build_block, get_block

from formulas import se_macs

GATE = textwrap.dedent('''
    """A 15-line channel gate."""
    import torch
    from torch import nn


    class Gate(nn.Module):
        def __init__(self, channels, reduction=8):
            super().__init__()
            hidden = max(1, channels // reduction)
            self.fc1 = nn.Conv2d(channels, hidden, 1)
            self.fc2 = nn.Conv2d(hidden, channels, 1)
            self.sigmoid = nn.Sigmoid()

        def forward(self, x):
            s = x.mean((2, 3), keepdim=True)
            return x * self.sigmoid(self.fc2(torch.relu(self.fc1(s))))
''')
SIZE = (3, 64, 64)


def gate_params(c: int, reduction: int) -> int:
    hidden = max(1, c // reduction)
    return 2 * c * hidden + hidden + c


@pytest.fixture
def gate_dir(tmp_path, monkeypatch):
    (tmp_path / "gate.py").write_text(GATE)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_insert_resnet50_stages_3_4_gives_9_gates_with_the_formulas_parameters(gate_dir, cli):
    code, out, err = cli(
        "insert",
        "resnet50",
        "--attn",
        "gate.py:Gate",
        "--option",
        "reduction=4",
        "--stages",
        "3,4",
        "--input-size",
        "64",
        "--json",
    )
    assert code == 0, err
    report = json.loads(out)
    rows = report["insertions"]
    assert len(rows) == 9
    assert [r["channels"] for r in rows] == [1024] * 6 + [2048] * 3
    for r in rows:
        assert r["params"] == gate_params(r["channels"], 4)
        assert r["attn"] == f"{gate_dir / 'gate.py'}:Gate"  # the recipe names the class by its (absolute) reference
        assert r["module"].endswith(".gate") and r["options"]["reduction"] == 4
    assert report["params"]["delta"] == 6 * gate_params(1024, 4) + 3 * gate_params(2048, 4)


@pytest.mark.slow  # a resnet50 rewritten twice: 2-3 s, kept out of the fast subset's two minutes
def test_after_anchor_and_a_per_stage_option_list(gate_dir):
    _, report = insert("resnet50", "gate.py:Gate", after="layer3.*.conv2", input_size=SIZE)
    assert [i.module for i in report.insertions] == [f"layer3.{k}.conv2_gate" for k in range(6)]
    assert all(i.params == gate_params(256, 8) for i in report.insertions)
    _, report = insert("resnet50", "gate.py:Gate", stages=[3, 4], input_size=SIZE, reduction=[2, 16])
    assert [i.params for i in report.insertions] == [gate_params(1024, 2)] * 6 + [gate_params(2048, 16)] * 3


def test_identity_init_is_exact_through_the_alpha_gate_and_a_perturbed_block_changes_the_output(gate_dir, resnet18):
    torch.manual_seed(0)
    base = resnet18().eval()
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        y = base(x)
    model, report = insert(base, "gate.py:Gate", init="identity", input_size=SIZE)
    model.eval()
    assert {i.options["identity"] for i in report.insertions} == {"α-gate"}
    with torch.no_grad():
        assert torch.equal(model(x), y)
        model.get_submodule(report.insertions[0].module).alpha.fill_(0.5)
        assert not torch.allclose(model(x), y)


def test_a_block_with_its_own_exact_identity_uses_it(tmp_path):
    (tmp_path / "own.py").write_text(
        textwrap.dedent("""
        from torch import nn

        class Scale(nn.Module):
            def __init__(self, channels):
                super().__init__()
                self.w = nn.Parameter(nn.init.uniform_(nn.Parameter(__import__("torch").empty(1, channels, 1, 1))))

            def zero_init_last(self):
                nn.init.ones_(self.w)

            def forward(self, x):
                return x * self.w
    """)
    )
    m = build_block(f"{tmp_path / 'own.py'}:Scale", 16, "identity", size=(5, 5))
    x = torch.randn(2, 16, 5, 5)
    assert torch.equal(m(x), x) and type(m).__name__ == "Scale"
    assert attnsurgeon.blocks.describe_block(f"{tmp_path / 'own.py'}:Scale", m, {}) == {"identity": "own"}


def test_profile_counts_its_macs_from_the_formula(gate_dir):
    from attnsurgeon.profiling.flops import count_macs

    m = build_block("gate.py:Gate", 64, size=(7, 9), reduction=4)
    assert count_macs(m.eval(), torch.randn(1, 64, 7, 9)).macs == se_macs(64, 7, 9, 16)
    result = attnsurgeon.profile(
        "resnet18", attn="gate.py:Gate", stages=[4], input_size=SIZE, min_run_time=0.01, max_run_time=0.02
    )
    assert [i.macs for i in result.insertions] == [se_macs(512, 2, 2, 64)] * 2
    assert result.insertions[0].attn.endswith("gate.py:Gate")


@pytest.mark.slow
def test_safetensors_round_trip_reimports_the_class_and_the_other_formats_agree(gate_dir, monkeypatch):
    from attnsurgeon.blocks import external

    torch.manual_seed(0)
    model, report = insert("resnet18", "gate.py:Gate", stages=[3, 4], input_size=SIZE, reduction=4)
    model.eval()
    x = torch.randn(3, *SIZE)
    with torch.no_grad():
        expected = model(x)
    for ext in ("safetensors", "pt2", "onnx", "ts"):
        written = attnsurgeon.export(model, gate_dir / f"m.{ext}")
        assert written.max_abs_diff <= 1e-4
    monkeypatch.setattr(external, "_RESOLVED", {})  # as in a new process: the file is imported again
    rebuilt = attnsurgeon.load(gate_dir / "m.safetensors")
    with torch.no_grad():
        assert torch.equal(rebuilt(x), expected)
        assert torch.allclose(torch.export.load(str(gate_dir / "m.pt2")).module()(x), expected, atol=1e-5)
        assert torch.allclose(torch.jit.load(str(gate_dir / "m.ts"))(x), expected, atol=1e-5)
    import onnxruntime as ort

    session = ort.InferenceSession(str(gate_dir / "m.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert torch.allclose(torch.from_numpy(got), expected, atol=1e-4)

    (gate_dir / "gate.py").write_text(GATE.replace("channels // reduction", "channels // reduction + 1"))
    with pytest.raises(AttnSurgeonError, match="does not match its tensors"):
        attnsurgeon.load(gate_dir / "m.safetensors")
    (gate_dir / "gate.py").unlink()
    with pytest.raises(AttnSurgeonError, match="block file .* does not exist"):
        attnsurgeon.load(gate_dir / "m.safetensors")


def test_a_class_given_in_python_goes_where_a_name_goes(resnet18):
    from timm.layers import EcaModule

    _, report = insert(resnet18(), EcaModule, stages=[4], input_size=SIZE, kernel_size=5)
    assert [i.attn for i in report.insertions] == ["timm.layers.eca:EcaModule"] * 2
    assert all(i.params == 5 for i in report.insertions)  # one 1-D conv of 5 taps, no bias
    assert [i.module for i in report.insertions] == ["layer4.0.eca_module", "layer4.1.eca_module"]


BAD = {
    "shape.py": (
        "class Shape(nn.Module):\n    def __init__(self, channels):\n        super().__init__()\n"
        "    def forward(self, x):\n        return x[:, :1]\n",
        "Shape",
        "changes the shape",
    ),
    "pair.py": (
        "class Pair(nn.Module):\n    def __init__(self, channels):\n        super().__init__()\n"
        "    def forward(self, x):\n        return x, x\n",
        "Pair",
        "returns a tuple",
    ),
    "flat.py": (
        "class Flat(nn.Module):\n    def __init__(self, channels):\n        super().__init__()\n"
        "    def forward(self, x):\n        n, c, h, w = x.shape\n        return x\n",
        "Flat",
        "fails on a 1-D map",
    ),
}


NET_1D = textwrap.dedent("""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv1 = nn.Conv1d(c, c, 3, padding=1)
            self.conv2 = nn.Conv1d(c, c, 3, padding=1)

        def forward(self, x):
            return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))

    def build():
        return nn.Sequential(nn.Conv1d(1, 8, 4, stride=4), nn.Sequential(Block(8), Block(8)))
""")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--attn", "missing.py:Gate"], "block file 'missing.py' does not exist"),
        (["--attn", "gate.py:Gat"], "has no 'Gat'; did you mean Gate?"),
        (
            ["--attn", "gate.py:Gate", "--option", "reductoin=2"],
            "takes no option 'reductoin' (its constructor takes: channels",
        ),
        (["--attn", "no_such_package_xyz.mod:Gate"], "cannot import module 'no_such_package_xyz.mod'"),
        (["--attn", "timm:ecca"], "has no 'ecca'"),
    ],
)
def test_refusals_before_the_model_is_loaded(gate_dir, cli, args, message):
    code, out, err = cli("insert", "resnet18", *args, "--out", "m.safetensors")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (gate_dir / "m.safetensors").exists()


@pytest.mark.parametrize("file", list(BAD))
def test_blocks_that_do_not_map_a_map_to_its_shape_are_refused(gate_dir, cli, file):
    text, cls, message = BAD[file]
    (gate_dir / file).write_text("from torch import nn\n\n" + text)
    if file == "flat.py":  # a 1-D (N, C, L) site for the rank failure
        (gate_dir / "net1d.py").write_text(NET_1D)
        model, extra = "net1d.py:build", ["--input-size", "1,400"]
    else:
        model, extra = "resnet18", ["--stages", "4", "--input-size", "64"]
    code, out, err = cli("insert", model, "--attn", f"{file}:{cls}", *extra, "--out", "m.safetensors")
    assert code == 2 and message in err and cls in err and len(err.strip().splitlines()) == 1, err
    assert not (gate_dir / "m.safetensors").exists()


def test_list_attn_shows_the_three_forms(cli):
    code, out, _ = cli("list", "attn")
    assert code == 0
    for form in ("path/to/file.py:Class", "package.module:Class", "timm:NAME"):
        assert form in out


def test_a_sweep_grid_mixes_zoo_names_and_references(gate_dir):
    from attnsurgeon.planning.recipes import read_recipe

    (gate_dir / "sub").mkdir()
    (gate_dir / "sub" / "gate.py").write_text(GATE)
    (gate_dir / "sub" / "grid.yaml").write_text(
        "model: resnet18\ngrid:\n  attn: [se, gate.py:Gate, timm:gc]\n  init: [default, identity]\n"
    )
    recipe = read_recipe(gate_dir / "sub" / "grid.yaml")
    attns = [c.insertions[0].attn for c in recipe.configurations]
    assert attns == [
        "se",
        "se",
        f"{gate_dir / 'sub' / 'gate.py'}:Gate",
        f"{gate_dir / 'sub' / 'gate.py'}:Gate",
        "timm:gc",
        "timm:gc",
    ]  # the file next to the recipe, not the one in the working folder
    assert get_block(attns[2]).external.file == str(gate_dir / "sub" / "gate.py")


# --------------------------------------------------------------------------- timm's own blocks, ultralytics' CBAM


def _timm_parity(model_name: str, attn: str, base=None) -> None:
    """``timm:NAME`` at the standard position equals timm's own ResNet built with that attn_layer:
    the same parameters, and the same outputs once timm's weights are copied in. ``base``: a plain
    ``model_name`` already built (its weights do not matter: timm's are copied in)."""
    import timm

    torch.manual_seed(0)
    base = (timm.create_model(model_name) if base is None else base).eval()
    ours, report = insert(base, f"timm:{attn}", input_size=SIZE)
    theirs = timm.create_model(model_name, block_args=dict(attn_layer=attn)).eval()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    leaf = report.insertions[0].module.rpartition(".")[2]
    assert [i.module.replace(f".{leaf}", ".se") for i in report.insertions] == [
        n for n, _ in theirs.named_modules() if n.endswith(".se")
    ]  # in every bottleneck, where timm puts it
    renamed = {k.replace(f".{leaf}.", ".se."): v for k, v in ours.state_dict().items()}
    assert set(renamed) == set(theirs.state_dict())
    ours.load_state_dict({k.replace(".se.", f".{leaf}."): v for k, v in theirs.state_dict().items()})
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), theirs(x), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def resnet26():
    """Returns a function giving a fresh copy of one plain timm resnet26 (0.07 s instead of a 0.3 s build)."""
    import timm

    built = timm.create_model("resnet26")
    return lambda: copy.deepcopy(built)


def test_timm_eca_at_the_standard_position_is_timms_eca_resnet(resnet26):
    _timm_parity("resnet26", "eca", resnet26())


@pytest.mark.parametrize("attn", ["se", "cbam", "gc"])
def test_timm_blocks_at_the_standard_position_are_timms_resnet_with_that_attn_layer(resnet26, attn):
    _timm_parity("resnet26", attn, resnet26())


@pytest.mark.slow
def test_timm_eca_in_resnet50_is_timms_eca_resnet50():
    _timm_parity("resnet50", "eca")


@pytest.mark.slow
def test_ultralytics_cbam_after_model_9_of_yolov8n_builds_and_trains_one_step():
    from ultralytics.nn.modules.conv import CBAM

    from attnsurgeon import load_model

    torch.manual_seed(0)
    model, report = insert(
        load_model("yolo:yolov8n", nc=2), "ultralytics.nn.modules.conv:CBAM", after="model.9", input_size=SIZE
    )
    (row,) = report.insertions
    block = model.get_submodule(row.module)
    assert isinstance(block, CBAM) and row.channels == 256 and row.params == 256 * 256 + 256 + 2 * 7 * 7
    before = {k: v.clone() for k, v in block.state_dict().items()}
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    out = model(torch.randn(2, *SIZE))
    from wiring import flat_outputs

    loss = sum(o.float().pow(2).mean() for o in flat_outputs(out))
    loss.backward()
    assert block.channel_attention.fc.weight.grad.abs().sum() > 0
    optimizer.step()
    assert any(not torch.equal(before[k], v) for k, v in block.state_dict().items())


def test_the_same_relative_reference_in_another_folder_names_that_folders_file(tmp_path, monkeypatch):
    for name, reduction in (("a", 2), ("b", 4)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "gate.py").write_text(GATE.replace("reduction=8", f"reduction={reduction}"))
    counts = []
    for name in ("a", "b"):
        monkeypatch.chdir(tmp_path / name)
        block = build_block("gate.py:Gate", 64, size=(4, 4))
        counts.append(sum(p.numel() for p in block.parameters()))
    assert counts == [gate_params(64, 2), gate_params(64, 4)]
