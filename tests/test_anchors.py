"""Anchors: a block after or before any module (--after/--before), in any model.

References are independent of the code under test: segmentation_models_pytorch's own scSE U-Net
(its weights copied over, equal outputs), the graph itself (what reads the inserted module, what
it reads), analytic parameter formulas, and perturbation (a wired block changes the output).
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import attnsurgeon
from attnsurgeon import AttnSurgeonError
from attnsurgeon.graph.anchors import glob_regex, match_modules
from attnsurgeon.rewriting.apply import make_spec
from attnsurgeon.rewriting.surgery import count_params

from conftest import SMALL
from formulas import se_params


def _perturb(model: nn.Module, modules: list[str]) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for name in modules:
            for p in model.get_submodule(name).parameters():
                p.add_(torch.randn_like(p) * 0.5)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in now)


def _node(gm, target):
    (n,) = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == target]
    return n


# --------------------------------------------------------------------------- globs


def test_globs_stay_within_a_dotted_name_unless_doubled():
    names = ["layer3", "layer3.0", "layer3.0.conv2", "layer3.1.conv2", "layer3.0.downsample.0", "layer30.conv2"]
    assert match_modules("layer3.*", names) == ["layer3.0"]
    assert match_modules("layer3.*.conv2", names) == ["layer3.0.conv2", "layer3.1.conv2"]
    assert match_modules("**.conv2", names) == ["layer3.0.conv2", "layer3.1.conv2", "layer30.conv2"]
    assert match_modules("layer3.[!1].conv?", names) == ["layer3.0.conv2"]
    assert not glob_regex("layer3").match("layer3.0")


# --------------------------------------------------------------------------- the examples


@pytest.mark.slow
def test_se_after_each_conv2_of_resnet50_stage3_sits_before_bn2():
    base = torchvision_resnet("resnet50")
    gm, report = attnsurgeon.insert(base, attn="se", after="layer3.*.conv2", input_size=SMALL, init="identity")
    names = [f"layer3.{i}" for i in range(6)]
    assert [(i.block, i.stage, i.position, i.anchor, i.module) for i in report.insertions] == [
        (b, 3, "after", f"{b}.conv2", f"{b}.conv2_se") for b in names
    ]
    for b in names:  # conv2 -> se -> bn2, and nothing else reads conv2
        se = _node(gm, f"{b}.conv2_se")
        assert se.args[0].target == f"{b}.conv2" and list(se.args[0].users) == [se]
        assert [u.target for u in se.users] == [f"{b}.bn2"]
    assert report.params["delta"] == 6 * se_params(256, 16)  # timm's rule: 256 / 16 = 16 hidden
    x = torch.randn(2, *SMALL)
    with torch.no_grad():
        assert torch.equal(gm.eval()(x), base.eval()(x))  # identity init: exact
        _perturb(gm, [f"{b}.conv2_se" for b in names])
        assert not torch.allclose(gm(x), base(x), atol=1e-3)  # wired: the blocks are called


def torchvision_resnet(name: str) -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.get_model(name).eval()


@pytest.mark.slow
def test_smp_unet_with_scse_anchors_equals_smps_own_scse_decoder():
    smp = pytest.importorskip("segmentation_models_pytorch")
    torch.manual_seed(0)
    base = smp.Unet("resnet34", encoder_weights=None).eval()
    ref = smp.Unet("resnet34", encoder_weights=None, decoder_attention_type="scse").eval()
    # smp runs attention1 only where a skip connection is concatenated: blocks 0-3 of 5
    plan = [
        make_spec("scse", before="decoder.blocks.[0-3].conv1", reduction=16, fusion="sum"),
        make_spec("scse", after="decoder.blocks.*.conv2", reduction=16, fusion="sum"),
    ]
    gm, report = attnsurgeon.apply_plan(base, plan, input_size=(3, 64, 64))
    assert [i.module for i in report.insertions] == (
        [f"decoder.blocks.{k}.scse_conv1" for k in range(4)] + [f"decoder.blocks.{k}.conv2_scse" for k in range(5)]
    )
    unused = count_params(ref.decoder.blocks[4].attention1)  # built by smp, never called
    assert report.params["modified"] == count_params(ref) - unused
    names = {"cSE.1": "fc1", "cSE.3": "fc2", "sSE.0": "spatial"}
    state = {}
    for key, value in ref.state_dict().items():
        if ".attention" in key and ".attention." in key:
            block, rest = key.split(".attention", 1)
            which, _, tail = rest.partition(".attention.")
            sub, _, param = tail.rpartition(".")
            if block.endswith("4") and which == "1":
                continue
            key = f"{block}.{'scse_conv1' if which == '1' else 'conv2_scse'}.{names[sub]}.{param}"
        state[key] = value
    gm.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(gm.eval()(x), ref(x), atol=1e-6)


# --------------------------------------------------------------------------- any module, any rank


AUDIO = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv1d(1, 16, 9, stride=4)
        self.conv = nn.Conv1d(16, 24, 3, padding=1)
        self.bn = nn.BatchNorm1d(24)
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(torch.relu(self.stem(x))))).mean(-1))

def build():
    return Net()
"""


def test_after_a_conv1d_in_a_1d_net(tmp_path):
    path = tmp_path / "audio.py"
    path.write_text(AUDIO)
    loaded = attnsurgeon.load_model(f"{path}:build")
    gm, report = attnsurgeon.insert(loaded, attn="eca", after="conv", input_size=(1, 400), init="identity")
    (ins,) = report.insertions
    assert (ins.anchor, ins.layout, ins.channels, ins.module) == ("conv", "NCL", 24, "conv_eca")
    assert [u.target for u in _node(gm, "conv_eca").users] == ["bn"]
    x = torch.randn(2, 1, 400)
    with torch.no_grad():
        assert torch.equal(gm.eval()(x), loaded.model.eval()(x))
        _perturb(gm, ["conv_eca"])
        assert not torch.allclose(gm(x), loaded.model(x), atol=1e-4)


@pytest.mark.slow
def test_after_a_stage_of_a_video_model():
    base = torchvision_resnet("r3d_18")
    size = (3, 4, 32, 32)
    gm, report = attnsurgeon.insert(base, attn="se", after="layer2", input_size=size, init="identity")
    (ins,) = report.insertions
    assert (ins.module, ins.layout, ins.channels, ins.stage) == ("layer2_se", "NCDHW", 128, 2)
    assert report.params["delta"] == se_params(128, 8)
    x = torch.randn(1, *size)
    with torch.no_grad():
        assert torch.equal(gm.eval()(x), base(x))
        _perturb(gm, ["layer2_se"])
        assert not torch.allclose(gm(x), base(x), atol=1e-4)


def test_tokens_of_a_vit_and_a_2d_block_refused_there():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=7).eval()
    gm, report = attnsurgeon.insert(vit, attn="se", before="norm", input_size=(3, 32, 32), init="identity")
    (ins,) = report.insertions
    assert (ins.layout, ins.channels, ins.module) == ("NLC", 192, "se_norm")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(gm.eval()(x), vit(x))
        _perturb(gm, ["se_norm"])
        assert not torch.allclose(gm(x), vit(x), atol=1e-4)
    before = _state(vit)
    with pytest.raises(AttnSurgeonError, match=r"--before norm \(NLC map of 192 channels\): coord needs a 2-D"):
        attnsurgeon.insert(vit, attn="coord", before="norm", input_size=(3, 32, 32))
    with pytest.raises(
        AttnSurgeonError,
        match=r"--before head: the input of Linear 'head' is a \(1, 192\) tensor, not a "
        r"feature map",
    ):
        attnsurgeon.insert(vit, attn="se", before="head", input_size=(3, 32, 32))
    assert _same_state(vit, before)


@pytest.mark.slow
def test_a_module_the_tracer_keeps_whole_is_an_anchor_but_not_what_is_inside_it():
    pytest.importorskip("timm")
    loaded = attnsurgeon.load_model("timm:mobilevit_xxs")
    gm, report = attnsurgeon.insert(loaded, attn="se", after="stages.3.1", input_size=SMALL)
    (ins,) = report.insertions
    assert (ins.block, ins.stage, ins.module) == ("stages.3.1", 4, "stages.3.1_se")
    assert _node(gm, "stages.3.1_se").args[0].target == "stages.3.1"
    with pytest.raises(
        AttnSurgeonError,
        match=r"stages\.3\.1\.conv_kxk lies inside MobileVitBlock 'stages\.3\.1', which "
        "the tracer keeps whole",
    ):
        attnsurgeon.insert(loaded, attn="se", after="stages.3.1.conv_kxk", input_size=SMALL)


@pytest.mark.slow
def test_detector_part_anchor_and_refusals_outside_it():
    from test_segdet import DETECTORS, SIZE

    loaded = attnsurgeon.load_model("retinanet_resnet50_fpn", **DETECTORS["retinanet_resnet50_fpn"])
    before = _state(loaded.model)
    model, report = attnsurgeon.insert(
        loaded, attn="se", after="backbone.body.layer3", input_size=SIZE, init="identity"
    )
    (ins,) = report.insertions
    assert (ins.module, ins.stage, ins.channels) == ("backbone.body.layer3_se", 3, 1024)
    assert report.target == ["backbone"]
    (se,) = [n for n in model.backbone.graph.nodes if n.target == "body.layer3_se"]
    assert {u.target for u in se.users} >= {"body.layer4.0.conv1", "body.layer4.0.downsample.0"}
    images = [torch.rand(*SIZE)]
    with torch.no_grad():
        loaded.model.eval(), model.eval()
        ref = loaded.model(images)[0]["scores"]
        assert torch.equal(model(images)[0]["scores"], ref)
    with pytest.raises(AttnSurgeonError, match=r"--after backbone\.body: the output of .* is not one tensor"):
        attnsurgeon.insert(loaded, attn="se", after="backbone.body", input_size=SIZE)
    with pytest.raises(
        AttnSurgeonError, match=r"head\.classification_head\.conv\.0.* lies outside the traced part \(backbone\)"
    ):
        attnsurgeon.insert(loaded, attn="se", after="head.classification_head.conv.0", input_size=SIZE)
    assert _same_state(loaded.model, before)


SHARED = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.pair = nn.Conv2d(16, 8, 1)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        y = self.a(x)
        z = self.b(self.b(y))          # b runs twice: shared weights
        w = self.pair(torch.cat([y, z], 1))
        return self.head(w.mean((2, 3)))

def build():
    return Net()
"""


def test_refusals_leave_the_model_as_it_was_and_write_nothing(tmp_path, cli):
    path = tmp_path / "shared.py"
    path.write_text(SHARED)
    loaded = attnsurgeon.load_model(f"{path}:build")
    before = _state(loaded.model)
    cases = [
        (dict(after="b"), r"'b' runs 2 times in one forward"),
        (dict(after="c"), r"--after c: no module matches"),
        (dict(after="paír"), r"Did you mean: pair"),
        (dict(before="head"), r"--before head: the input of Linear 'head' is a \(1, 8\) tensor"),
        (dict(before="a", position="pre"), r"leave --position \('pre'\) out"),
        (dict(after="a", replace=True), r"--replace .* --after does not apply"),
    ]
    for kwargs, message in cases:
        with pytest.raises(AttnSurgeonError, match=message):
            attnsurgeon.insert(loaded, attn="se", input_size=(3, 16, 16), **kwargs)
    with pytest.raises(AttnSurgeonError, match=r"sk takes the place of a convolution and cannot go --after"):
        attnsurgeon.insert(loaded, attn="sk", after="a", input_size=(3, 16, 16))
    assert _same_state(loaded.model, before)
    out = tmp_path / "m.safetensors"
    for args, message in [
        (["--after", "b"], "runs 2 times"),
        (["--after", "x", "--before", "y"], "in one insertion"),
        (["--after", "a", "-p", "post"], "leave --position"),
    ]:
        code, stdout, err = cli(
            "insert", f"{path}:build", "--attn", "se", "--input-size", "3,16,16", "--out", out, *args
        )
        assert code == 2 and message in err and "Traceback" not in err and stdout == ""
        assert not out.exists() and list(tmp_path.iterdir()) == [path]
    # a module that gets one tensor is fine even when its input feeds others too: only it sees the block
    gm, report = attnsurgeon.insert(loaded, attn="se", before="pair", reduction=4, input_size=(3, 16, 16))
    (ins,) = report.insertions
    assert ins.channels == 16 and [u.target for u in _node(gm, "se_pair").users] == ["pair"]


# --------------------------------------------------------------------------- everything else works on anchors


def test_stages_and_blocks_narrow_the_anchors():
    base = torchvision_resnet("resnet18")
    _, report = attnsurgeon.insert(base, attn="eca", after="**.conv2", stages=[2, 3], input_size=SMALL)
    assert [i.anchor for i in report.insertions] == [
        "layer2.0.conv2",
        "layer2.1.conv2",
        "layer3.0.conv2",
        "layer3.1.conv2",
    ]
    _, report = attnsurgeon.insert(base, attn="eca", after="**.conv2", blocks="layer4.1", input_size=SMALL)
    assert [i.anchor for i in report.insertions] == ["layer4.1.conv2"]
    with pytest.raises(
        AttnSurgeonError, match=r"none of the 1 matching modules \(fc\) lies inside the selected stages 2"
    ):
        attnsurgeon.insert(base, attn="eca", before="fc", stages=[2], input_size=SMALL)


@pytest.mark.slow
def test_cli_insert_with_anchors_saves_and_reloads_and_exports_every_format(cli, tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "a.safetensors"
    code, stdout, err = cli(
        "insert",
        "resnet18",
        "--attn",
        "cbam",
        "--after",
        "layer2.*.conv1,layer4",
        "--input-size",
        "32",
        "--out",
        out,
        "--json",
    )
    assert code == 0, err
    report = json.loads(stdout)
    assert [(i["anchor"], i["module"]) for i in report["insertions"]] == [
        ("layer2.0.conv1", "layer2.0.conv1_cbam"),
        ("layer2.1.conv1", "layer2.1.conv1_cbam"),
        ("layer4", "layer4_cbam"),
    ]
    assert report["plan"] == [{"attn": "cbam", "after": ["layer2.*.conv1", "layer4"], "init": "default"}]
    model, _ = attnsurgeon.insert("resnet18", attn="cbam", after="layer2.*.conv1,layer4", input_size=32)
    reloaded = attnsurgeon.load(out)
    assert [i.module for i in reloaded.attnsurgeon_report.insertions] == [i["module"] for i in report["insertions"]]
    for fmt in ("pt2", "onnx", "ts"):
        code, _, err = cli("export", out, "--out", tmp_path / f"a.{fmt}")
        assert code == 0, err  # each is loaded back and compared with the model by export itself


@pytest.mark.slow
def test_recipe_and_sweep_grid_take_anchors(tmp_path, cli):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: resnet18\ninput_size: [3, 32, 32]\ninsertions:\n  - attn: se\n    after: layer3.*.conv1\n"
        "  - attn: eca\n    before: [fc, layer4.0]\n"
    )
    from attnsurgeon.planning.recipes import read_recipe

    code, _, err = cli("apply", recipe)  # the modules are known once the model is traced
    assert code == 2 and "r.yaml: insertion 2 of 2 (eca before fc,layer4.0): --before fc: the input of Linear" in err
    recipe.write_text(
        recipe.read_text().replace("[fc, layer4.0]", "layer4.0").replace("    after:", "    position: pre\n    after:")
    )
    with pytest.raises(AttnSurgeonError, match=r"line 5: insertions\[0\]\.position: --after .* leave --position"):
        read_recipe(recipe)
    recipe.write_text(recipe.read_text().replace("    position: pre\n", ""))
    code, stdout, err = cli("apply", recipe, "--json")
    assert code == 0, err
    assert [i["module"] for i in json.loads(stdout)["insertions"]] == [
        "layer3.0.conv1_se",
        "layer3.1.conv1_se",
        "layer4.eca_0",
    ]
    sweep = tmp_path / "s.yaml"
    sweep.write_text(
        "model: resnet18\ninput_size: [3, 32, 32]\ngrid:\n  attn: [se]\n  after: [layer3, layer4]\n"
        "profile: {min_run_time: 0.01, max_run_time: 0.02}\n"
    )
    code, stdout, err = cli("sweep", sweep, "--out", tmp_path / "sw", "--json")
    assert code == 0, err
    rows = [r for r in json.loads(stdout)["rows"] if r["name"] != "base"]
    assert [r["name"] for r in rows] == ["after=layer3", "after=layer4"] and all(r["status"] == "ok" for r in rows)
    assert [r["delta"]["params"] for r in rows] == [se_params(256, 16), se_params(512, 32)]


@pytest.mark.slow
def test_memory_efficient_profile_and_plot_on_an_anchor(tmp_path):
    base = torchvision_resnet("resnet18")
    torch.manual_seed(0)
    plain, _ = attnsurgeon.insert(base, attn="se", after="layer3.*.bn2", input_size=32)
    lean, report = attnsurgeon.insert(base, attn="se", after="layer3.*.bn2", input_size=32, memory_efficient=True)
    lean.load_state_dict(plain.state_dict())
    assert [s.module for s in report.memory_efficient] == ["layer3.0.bn2_se", "layer3.1.bn2_se"]
    x = torch.randn(2, 3, 32, 32)
    for m in (plain, lean):
        m.train()
        m(x).square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), lean.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-5), name
    result = attnsurgeon.profile(
        base, attn="se", after="layer3.*.bn2", input_size=32, min_run_time=0.01, max_run_time=0.02
    )
    assert [r.module for r in result.insertions] == ["layer3.0.bn2_se", "layer3.1.bn2_se"]
    assert result.insertions[0].where == "after layer3.0.bn2"  # the breakdown names the anchor
    from attnsurgeon.pictures.plot import write_insertion_map

    loaded = attnsurgeon.load_model("resnet18")
    model, rep = attnsurgeon.insert(loaded, attn="se", after="layer3.*.bn2", input_size=32)
    drawn = write_insertion_map(loaded, model, rep, tmp_path / "map.svg", "params")
    svg = drawn.read_text()
    assert "insertion:layer3.0.bn2_se" in svg and "insertion:layer3.1.bn2_se" in svg


@pytest.mark.slow
def test_inspect_lists_the_anchors_with_shapes(cli):
    code, stdout, err = cli("inspect", "resnet18", "--anchors", "--input-size", "32", "--json")
    assert code == 0, err
    rows = {r["module"]: r for r in json.loads(stdout)["anchors"]}
    assert rows["layer3.0.conv2"]["output"] == [1, 256, 2, 2] and rows["layer3.0.conv2"]["after"] == "NCHW"
    assert rows["layer3"]["input"] == [1, 128, 4, 4] and rows["layer3"]["stage"] == 3
    assert rows["fc"]["before"] is None and rows["fc"]["type"] == "Linear"
    code, stdout, _ = cli("inspect", "resnet18", "--anchors", "--input-size", "32")
    assert code == 0 and "layer3.0.conv2" in stdout and "--after" in stdout


@pytest.mark.slow
def test_explain_reads_the_gates_of_anchored_blocks(tmp_path):
    pytest.importorskip("pytorch_grad_cam")
    from test_explain import _image

    from attnsurgeon.pictures.explain import explain

    _image(tmp_path / "a.png")
    result = explain("resnet18", [tmp_path / "a.png"], attn="cbam", after="layer3.*.conv2", input_size=64)
    gates = {g["module"] for g in result.to_dict()["images"][0]["modified"]["gates"]}
    assert {"layer3.0.conv2_cbam", "layer3.1.conv2_cbam"} <= gates


@pytest.mark.slow
def test_an_identity_placeholder_is_no_attention_the_model_has():
    smp = pytest.importorskip("segmentation_models_pytorch")
    _, plain = attnsurgeon.inspect_model(smp.Unet("resnet34", encoder_weights=None), input_size=(3, 64, 64))
    assert plain.existing_attention == []  # smp's Attention(None) is an nn.Identity
    _, scse = attnsurgeon.inspect_model(
        smp.Unet("resnet34", encoder_weights=None, decoder_attention_type="scse"), input_size=(3, 64, 64)
    )
    assert len(scse.existing_attention) == 9  # attention1 of block 4 is never called: no skip there


YOLO = """
def build():
    from ultralytics.nn.tasks import DetectionModel

    return DetectionModel("yolov8n.yaml", verbose=False)
"""


@pytest.mark.slow
def test_yolov8n_through_a_factory_with_cbam_after_model_9(tmp_path, monkeypatch):
    pytest.importorskip("ultralytics")
    from attnsurgeon.loading.samples import flatten_outputs

    monkeypatch.setenv("YOLO_OFFLINE", "1")
    path = tmp_path / "yolo.py"
    path.write_text(YOLO)
    loaded = attnsurgeon.load_model(f"{path}:build")
    model, report = attnsurgeon.insert(loaded, attn="cbam", after="model.9", input_size=64, init="identity")
    (ins,) = report.insertions
    assert (ins.anchor, ins.module, ins.channels) == ("model.9", "model.9.cbam_after", 256)  # SPPF's output
    # train mode: BN uses batch statistics, so a random-init YOLO's head still sees what SPPF gives
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        base_out = flatten_outputs(loaded.model.train()(x))
        assert all(torch.equal(a, b) for a, b in zip(flatten_outputs(model.train()(x)), base_out, strict=True))
        _perturb(model, ["model.9.cbam_after"])
        outs = flatten_outputs(model(x))
        changed = [not torch.allclose(a, b, rtol=1e-3, atol=1e-5) for a, b in zip(outs, base_out, strict=True)]
        assert changed and all(changed)  # every head map reads SPPF through the FPN


@pytest.mark.slow
def test_inspect_anchors_takes_a_glob_and_says_how_many_rows_it_left_out(cli):
    """213 rows for a U-Net, the decoder's from row 143 (issue 29): a glob keeps the modules it matches and
    those inside them; the rest are counted; a glob that matches nothing is a one-line error."""
    code, stdout, err = cli("inspect", "resnet18", "--anchors", "layer4.*", "--input-size", "32", "--json")
    assert code == 0, err
    data = json.loads(stdout)
    names = [r["module"] for r in data["anchors"]]
    assert names and all(n.startswith("layer4.") for n in names) and "layer4.1.conv2" in names
    code, every, _ = cli("inspect", "resnet18", "--anchors", "--input-size", "32", "--json")
    total = len(json.loads(every)["anchors"])
    assert data["anchors_left_out"] == total - len(names) > 0 and json.loads(every)["anchors_left_out"] == 0
    code, stdout, _ = cli("inspect", "resnet18", "layer4.1", "--input-size", "32")  # a glob implies --anchors
    assert (
        code == 0
        and f"6 rows shown (the modules matching 'layer4.1' and those inside them), {total - 6} left out" in stdout
    )
    code, stdout, err = cli("inspect", "resnet18", "--anchors", "layr4.*", "--input-size", "32")
    assert code == 2 and stdout == "" and len(err.strip().splitlines()) == 1
    assert "--anchors layr4.*: no module matches" in err and "layer4" in err
