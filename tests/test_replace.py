"""--replace: a block in place of the attention a model already has, and --attn none to remove it.

References are independent of the tool: the libraries' own modules (torchvision's
SqueezeExcitation, timm's resnet50/seresnet50, timm's EcaModule/CbamModule) and eager copies of
the models whose attention modules are swapped by hand (``setattr``).
"""

import copy
import json

import pytest
import timm
import torch
import torchvision
from timm.layers import EcaModule
from timm.layers.cbam import CbamModule
from torch import nn
from torchvision.ops import SqueezeExcitation

from attnsurgeon import AttnSurgeonError, InsertionSpec, apply_plan, insert, profile
from attnsurgeon.graph.anatomy import analyse
from attnsurgeon.graph.attention import attention_regions
from attnsurgeon.graph.tracing import trace

from formulas import n_params

SMALL = (3, 64, 64)
FAST = {"min_run_time": 0.05, "max_run_time": 0.1}


def _tv(name):
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None).eval()


def _swapped(model, names, make):
    """An eager copy of ``model`` whose modules ``names`` are replaced by ``make(name, old)``, by hand."""
    out = copy.deepcopy(model)
    for name in names:
        parent, _, leaf = name.rpartition(".")
        owner = out.get_submodule(parent)
        setattr(owner, leaf, make(name, owner.get_submodule(leaf)))
    return out.eval()


def _x():
    torch.manual_seed(1)
    return torch.randn(2, *SMALL)


def _same_outputs(a, b, x):
    with torch.no_grad():
        ya, yb = a.eval()(x), b.eval()(x)
    assert ya.shape == yb.shape
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- the models of the issue


@pytest.mark.slow
def test_efficientnet_b0_se_to_eca():
    base = _tv("efficientnet_b0")
    se = {n: m for n, m in base.named_modules() if isinstance(m, SqueezeExcitation)}
    gm, report = insert(base, "eca", replace=True, input_size=SMALL)
    assert len(se) == 16 and [i.module for i in report.insertions] == list(se)
    for ins in report.insertions:
        old = se[ins.module]
        assert ins.channels == old.fc1.in_channels and ins.replaced == "SqueezeExcitation"
        assert ins.replaced_params == n_params(old) and ins.params == n_params(EcaModule(ins.channels))
        assert isinstance(gm.get_submodule(ins.module), EcaModule)
    expected = (
        n_params(base)
        - sum(n_params(m) for m in se.values())
        + sum(n_params(EcaModule(m.fc1.in_channels)) for m in se.values())
    )
    assert report.params["modified"] == n_params(gm) == expected
    assert not [
        n
        for n in gm.graph.nodes
        if any(v[1] is SqueezeExcitation for v in (n.meta.get("nn_module_stack") or {}).values())
    ]
    # the rewritten model is the eager model with each SE swapped for the new ECA module, by hand
    _same_outputs(gm, _swapped(base, se, lambda name, _: gm.get_submodule(name)), _x())


@pytest.mark.slow
def test_efficientnet_b0_se_removed_and_identity_init_is_removal_plus_an_identity():
    base = _tv("efficientnet_b0")
    se = [n for n, m in base.named_modules() if isinstance(m, SqueezeExcitation)]
    removed, report = insert(base, "none", replace=True, input_size=SMALL)
    assert [i.attn for i in report.insertions] == ["none"] * 16 and all(i.params == 0 for i in report.insertions)
    reference = _swapped(base, se, lambda *_: nn.Identity())
    assert report.params["modified"] == n_params(removed) == n_params(reference)
    assert report.params["delta"] == -sum(i.replaced_params for i in report.insertions)
    x = _x()
    _same_outputs(removed, reference, x)
    # --init identity: each new ECA is an exact identity, so the model equals the one without SE
    eca, _ = insert(base, "eca", replace=True, init="identity", input_size=SMALL)
    with torch.no_grad():
        assert torch.equal(eca.eval()(x), removed.eval()(x))


def test_mobilenet_v3_large_se_to_cbam():
    base = _tv("mobilenet_v3_large")
    se = {n: m for n, m in base.named_modules() if isinstance(m, SqueezeExcitation)}
    gm, report = insert(base, "cbam", replace=True, input_size=SMALL)
    assert len(report.insertions) == len(se) == 8
    for ins in report.insertions:
        assert ins.channels == se[ins.module].fc1.in_channels
        assert ins.params == n_params(CbamModule(ins.channels, rd_ratio=1 / 16))  # timm's CBAM, its defaults
    assert report.params["delta"] == sum(i.params - i.replaced_params for i in report.insertions)
    _same_outputs(gm, _swapped(base, se, lambda name, _: gm.get_submodule(name)), _x())


def test_regnet_y_400mf_se_removed():
    base = _tv("regnet_y_400mf")
    se = [n for n, m in base.named_modules() if isinstance(m, SqueezeExcitation)]
    gm, report = insert(base, "none", replace=True, input_size=SMALL)
    assert len(se) == 16 and sorted(i.module for i in report.insertions) == sorted(se)
    reference = _swapped(base, se, lambda *_: nn.Identity())
    assert report.params["modified"] == n_params(reference)
    _same_outputs(gm, reference, _x())


@pytest.mark.slow
def test_timm_seresnet50_without_se_is_timm_resnet50():
    gm, report = insert("timm:seresnet50", "none", replace=True, input_size=SMALL)
    resnet50 = timm.create_model("resnet50").eval()
    assert report.params["modified"] == n_params(gm) == n_params(resnet50)
    gm.load_state_dict(resnet50.state_dict(), strict=True)  # the very same keys
    _same_outputs(gm, resnet50, _x())


@pytest.mark.slow
def test_timm_seresnet50_se_to_se_keeps_parameters_keys_and_outputs():
    torch.manual_seed(0)
    se50 = timm.create_model("seresnet50").eval()
    gm, report = insert(se50, "se", replace=True, reduction=16, input_size=SMALL)
    assert report.params["delta"] == 0 and len(report.insertions) == 16
    assert all(i.params == i.replaced_params for i in report.insertions)
    gm.load_state_dict(se50.state_dict(), strict=True)
    _same_outputs(gm, se50, _x())


# --------------------------------------------------------------------------- stacking


@pytest.mark.slow
def test_removed_se_then_standard_se_is_seresnet50_again():
    plan = [InsertionSpec("none", replace=True), InsertionSpec("se")]
    gm, report = apply_plan("timm:seresnet50", plan, input_size=SMALL)
    assert report.params["modified"] == n_params(timm.create_model("seresnet50"))
    new = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "layer1.0.se2"]
    assert len(new) == 1 and new[0].args[0].target == "layer1.0.bn3"  # the SE's old site, now fed by bn3


@pytest.mark.parametrize("order", ["replace-first", "insert-first"])
def test_replacement_and_a_3x3_insertion_compose_in_either_order(order):
    plan = [
        InsertionSpec("eca", replace=True, blocks=["features.4"]),
        InsertionSpec("cbam", "3x3", blocks=["features.4"]),
    ]
    gm, report = apply_plan(
        _tv("mobilenet_v3_large"), plan if order == "replace-first" else plan[::-1], input_size=SMALL
    )
    calls = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    eca, cbam = calls["features.4.block.2"], calls["features.4.cbam_3x3"]
    assert isinstance(gm.get_submodule(eca.target), EcaModule)
    assert eca.args[0] is cbam and cbam.args[0].target == "features.4.block.1.2"  # dw conv, bn, act -> CBAM -> ECA
    assert [u.target for u in eca.users] == ["features.4.block.3.0"]  # ... -> the projection conv
    with torch.no_grad():
        assert gm(_x()).shape == (2, 1000)


# --------------------------------------------------------------------------- what is a gate


class SELayer(nn.Module):  # a user's own SE, named as in many repositories
    def __init__(self, c):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(c, c // 4), nn.ReLU(), nn.Linear(c // 4, c), nn.Sigmoid())

    def forward(self, x):
        w = self.fc(x.mean((2, 3)))
        return x * w[:, :, None, None]


class GlobalContextBlock(nn.Module):  # GC: adds a broadcast context
    def __init__(self, c):
        super().__init__()
        self.transform = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x + self.transform(x.mean((2, 3), keepdim=True))


class GatherExcite(nn.Module):  # GE with a local extent: a full-size gate map
    def __init__(self, c):
        super().__init__()
        self.gather = nn.Conv2d(c, c, 3, stride=2, padding=1, groups=c)

    def forward(self, x):
        g = nn.functional.interpolate(self.gather(x), size=x.shape[-2:])
        return x * torch.sigmoid(g)


class NonLocalAttention(nn.Module):  # self-attention over positions, with its own residual add
    def __init__(self, c):
        super().__init__()
        self.q, self.k, self.v = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        n, c, h, w = x.shape
        q, k, v = (f(x).flatten(2) for f in (self.q, self.k, self.v))
        a = torch.softmax(q.transpose(1, 2) @ k, dim=-1)
        return x + (v @ a.transpose(1, 2)).view(n, c, h, w)


class _Block(nn.Module):
    def __init__(self, c, attn):
        super().__init__()
        self.conv1, self.conv2, self.attn = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1), attn

    def forward(self, x):
        return x + self.attn(self.conv2(torch.relu(self.conv1(x))))


def _net(*attns):
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Sequential(*[_Block(16, a) for a in attns])).eval()


def test_gates_are_told_from_self_attention():
    gm = trace(_net(SELayer(16), GlobalContextBlock(16), GatherExcite(16), NonLocalAttention(16)))
    analyse(gm, (3, 16, 16))
    regions = {r.type: r for r in attention_regions(gm)}
    assert regions["SELayer"].gate and regions["GlobalContextBlock"].gate and regions["GatherExcite"].gate
    assert not regions["NonLocalAttention"].gate and "not its input scaled" in regions["NonLocalAttention"].why
    # a timm SEModule kept whole by the tracer is checked by tracing it on its own
    timm_gm = trace(timm.create_model("seresnet18"))
    analyse(timm_gm, SMALL)
    assert all(r.gate and len(r.nodes) == 1 for r in attention_regions(timm_gm))


def test_self_attention_is_kept_and_named():
    model = _net(SELayer(16), NonLocalAttention(16))
    gm, report = insert(model, "eca", replace=True, input_size=(3, 16, 16))
    assert [(i.module, i.replaced) for i in report.insertions] == [("1.0.attn", "SELayer")]
    assert any("kept as they were" in n and "1.1.attn" in n for n in report.notes)
    with pytest.raises(
        AttnSurgeonError,
        match=r"no attention module in the selected blocks is a channel/spatial gate.*NonLocalAttention",
    ):
        insert(model, "eca", replace=True, blocks=["1.1"], input_size=(3, 16, 16))


def test_replace_errors(resnet18):
    with pytest.raises(
        AttnSurgeonError, match="hold no attention module to replace.*has no attention modules of its own"
    ):
        insert(resnet18(), "se", replace=True, input_size=SMALL)
    with pytest.raises(AttnSurgeonError, match=r"hold no attention module.*are in stages 3, 4, 5"):
        insert("mobilenet_v3_large", "cbam", replace=True, stages=[1, 2], input_size=SMALL)
    with pytest.raises(AttnSurgeonError, match="needs --replace"):
        insert("efficientnet_b0", "none", input_size=SMALL)
    with pytest.raises(AttnSurgeonError, match="position 'pre' does not apply"):
        insert("efficientnet_b0", "eca", "pre", replace=True, input_size=SMALL)


# --------------------------------------------------------------------------- profile, recipes, export, CLI


@pytest.mark.slow
def test_profile_removal_says_what_the_se_cost():
    r = profile("mobilenet_v3_small", "none", replace=True, input_size=SMALL, **FAST)
    d = r.to_dict()
    assert d["delta"]["params"] == -sum(
        n_params(m) for m in _tv("mobilenet_v3_small").modules() if isinstance(m, SqueezeExcitation)
    )
    assert d["delta"]["macs"] < 0 and r.unattributed_macs == 0
    assert sum(i["macs"] for i in d["insertions"]) == d["delta"]["macs"]  # each row: what its module cost
    assert {i["replaced"] for i in d["insertions"]} == {"SqueezeExcitation"}


def test_recipe_replace_and_its_errors():
    from attnsurgeon.planning.recipes import parse_recipe

    spec = parse_recipe({"model": "efficientnet_b0", "insertions": [{"attn": "none", "replace": True, "stages": [7]}]})
    assert spec.insertions[0].replace and spec.insertions[0].to_dict()["replace"] is True
    assert "replace" not in InsertionSpec("se").to_dict()  # recipes without it are unchanged
    with pytest.raises(AttnSurgeonError, match=r"insertions\[0\]\.attn: attention block 'none' .* needs --replace"):
        parse_recipe({"model": "m", "insertions": [{"attn": "none"}]})
    with pytest.raises(AttnSurgeonError, match=r"insertions\[0\]\.replace: expected bool"):
        parse_recipe({"model": "m", "insertions": [{"attn": "se", "replace": "yes"}]})
    grid = parse_recipe({"model": "efficientnet_b0", "grid": {"attn": ["eca", "none"], "replace": True}})
    assert [(c.name, c.insertions[0].replace) for c in grid.configurations] == [("eca", True), ("none", True)]
    with pytest.raises(AttnSurgeonError, match=r"grid\.attn: .* needs --replace"):
        parse_recipe({"model": "m", "grid": {"attn": ["eca", "none"]}})
    _, report = apply_plan("efficientnet_b0", spec.insertions, input_size=SMALL)
    assert [i.module for i in report.insertions] == ["features.7.0.block.2"]


@pytest.mark.slow
def test_saved_replacement_rebuilds_from_its_recipe(tmp_path):
    from attnsurgeon.saving.export import export, load

    gm, _ = insert("efficientnet_b0", "eca", replace=True, stages=[6, 7], input_size=SMALL)
    export(gm, tmp_path / "m.safetensors")
    _same_outputs(load(tmp_path / "m.safetensors"), gm, _x())


@pytest.mark.slow
def test_cli_replace(cli):
    code, out, err = cli("insert", "efficientnet_b0", "--attn", "eca", "--replace", "--input-size", "64", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert len(data["insertions"]) == 16
    assert all(i["replaced"] == "SqueezeExcitation" and i["position"] == "replace" for i in data["insertions"])
    assert data["plan"][0]["replace"] is True
    code, out, err = cli(
        "insert", "efficientnet_b0", "--attn", "none", "--replace", "--stages", "7", "--input-size", "64"
    )
    assert code == 0, err
    assert (
        "features.7.0.block.2" in out and "SqueezeExcitation (111,792)" in out and "1 attention module removed" in out
    )


@pytest.mark.slow
def test_inspect_says_what_replace_can_take(cli):
    code, out, err = cli("inspect", "mobilenet_v3_small", "--input-size", "64", "--json")
    assert code == 0, err
    data = json.loads(out)
    se = [n for n, m in _tv("mobilenet_v3_small").named_modules() if isinstance(m, SqueezeExcitation)]
    assert data["replaceable_attention"] == se and len(se) == 9
    code, out, _ = cli("inspect", "mobilenet_v3_small", "--input-size", "64")
    assert "--replace can take the place of 9 channel/spatial gates" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["efficientnet_b0", "--attn", "none"], "needs --replace"),
        (["resnet18", "--attn", "eca", "--replace"], "the model has no attention modules of its own"),
        (["efficientnet_b0", "--attn", "none", "--replace", "-r", "8"], "takes no block options"),
    ],
)
def test_cli_replace_errors(cli, args, message):
    code, out, err = cli("insert", *args, "--input-size", "64")
    assert code == 2 and message in err and out == "" and "Traceback" not in err


def test_profile_and_sweep_check_replace_before_building(cli, tmp_path):
    code, out, err = cli("profile", "efficientnet_b0", "--replace")
    assert code == 2 and "--replace needs --attn" in err
    code, out, err = cli("sweep", "efficientnet_b0", "--attn", "eca,none", "--out", tmp_path / "s")
    assert code == 2 and "needs --replace" in err and not (tmp_path / "s").exists()
