"""The positions ``stage`` (between stages, BAM's place) and ``conv`` (a conv block in place of a
block's spatial convolution), and the conv blocks sk and splat against timm's own models."""

import copy
import re

import pytest
import timm
import torch
from timm.layers.selective_kernel import SelectiveKernel
from timm.layers.split_attn import SplitAttn
from timm.models.resnest import ResNestBottleneck
from timm.models.resnet import ResNet
from torch import nn

import attnsurgeon
from attnsurgeon import AttnSurgeonError
from attnsurgeon.planning.schema import InsertionSpec, parse_insertion, validate
from attnsurgeon.profiling import profile
from attnsurgeon.rewriting.apply import make_spec
from attnsurgeon.rewriting.surgery import count_params

from conftest import SMALL
from formulas import make_divisible

FAST = dict(min_run_time=0.05, max_run_time=0.1, input_size=64)


def _calls(gm, target):
    return [n for n in gm.graph.nodes if n.op == "call_module" and n.target == target]


def _through_permutes(node, forward):
    """Past the permutes that move a channels-last map around an inserted module."""
    while node.op == "call_method" and node.target == "permute":
        node = next(iter(node.users)) if forward else node.args[0]
    return node


# --------------------------------------------------------------------------- stage


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v3_large", "convnext_tiny"])
def test_stage_goes_between_every_pair_of_stages_and_identity_is_exact(name):
    torch.manual_seed(0)
    base = attnsurgeon.load_model(name).model.eval()
    x = torch.randn(2, *SMALL)
    with torch.no_grad():
        expected = base(x)
    _, anatomy = attnsurgeon.inspect_model(base, input_size=SMALL)
    model, report = attnsurgeon.insert(copy.deepcopy(base), "se", "stage", init="identity", input_size=SMALL)
    n = len(anatomy.stages)
    assert n >= 4
    assert [i.stage for i in report.insertions] == list(range(1, n))  # every stage with a following one
    assert report.notes == [] or all("stage" not in note for note in report.notes)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), expected)
    names = {n.name: n for n in anatomy.gm.graph.nodes}
    for ins in report.insertions:
        stage, following = anatomy.stages[ins.stage - 1], anatomy.stages[ins.stage]
        (call,) = _calls(model, ins.module)
        # its input is the stage's output: the output of the stage's last block
        source = _through_permutes(call.args[0], forward=False)
        assert source.name == stage.blocks[-1].sites["post"].producer.name, ins.module
        # what reads it leads into the next stage: each reader is one of the next stage's first
        # block's nodes or one of their ancestors (a downsampling layer between the stages)
        first = {n.name for n in following.blocks[0].nodes}
        ahead, stack = set(), [names[f] for f in first]
        while stack:
            node = stack.pop()
            if node.name not in ahead:
                ahead.add(node.name)
                stack.extend(node.all_input_nodes)
        tail = _through_permutes(next(iter(call.users)), forward=True) if call.users else call
        readers = [u for u in (tail.users if tail is not call else call.users)]
        assert readers and all(u.name in ahead for u in readers), ins.module
        assert all(u.name not in {b for blk in stage.blocks for b in (n.name for n in blk.nodes)} for u in readers)


def test_stage_in_resnet18_is_read_by_the_next_stages_first_block_and_named_after_its_stage(resnet18):
    model, report = attnsurgeon.insert(resnet18(), "eca", "stage", input_size=SMALL)
    assert [i.module for i in report.insertions] == ["layer1.eca_stage", "layer2.eca_stage", "layer3.eca_stage"]
    (call,) = _calls(model, "layer1.eca_stage")
    assert {u.target for u in call.users} == {"layer2.0.conv1", "layer2.0.downsample.0"}
    assert call.args[0].target == "layer1.1.relu_1" or "layer1.1" in call.args[0].name.replace("_", ".")
    # one module per stage, whatever the block count; the delta is exactly the modules'
    assert report.params["delta"] == sum(i.params for i in report.insertions)


@pytest.mark.slow
def test_stage_selection():
    _, report = attnsurgeon.insert("resnet50", "se", "stage", stages=[2], input_size=SMALL)
    assert [i.module for i in report.insertions] == ["layer2.se_stage"]
    _, report = attnsurgeon.insert("resnet50", "se", "stage", blocks=["layer3.*"], input_size=SMALL)
    assert [i.module for i in report.insertions] == ["layer3.se_stage"]
    # --stages with the last stage: it is skipped with a note; the last stage alone is an error
    _, report = attnsurgeon.insert("resnet50", "se", "stage", stages=[3, 4], input_size=SMALL)
    assert [i.module for i in report.insertions] == ["layer3.se_stage"]
    assert any("layer4.2" in n and "no stage follows it" in n for n in report.notes)
    with pytest.raises(AttnSurgeonError, match="no stage follows it"):
        attnsurgeon.insert("resnet50", "se", "stage", stages=[4], input_size=SMALL)
    with pytest.raises(AttnSurgeonError, match=r"end no stage.*name the last block of one \(layer1.2\)"):
        attnsurgeon.insert("resnet50", "se", "stage", blocks=["layer1.0"], input_size=SMALL)


@pytest.mark.slow
def test_inspect_shows_stage_and_conv(cli):
    code, out, _ = cli("inspect", "resnet18", "--input-size", "64", "--json")
    assert code == 0
    import json

    blocks = {b["name"]: b["positions"] for b in json.loads(out)["blocks"]}
    assert [name for name, p in blocks.items() if "stage" in p] == ["layer1.1", "layer2.1", "layer3.1"]
    assert all("conv" in p for p in blocks.values())
    code, out, _ = cli("inspect", "resnet18", "--input-size", "64")
    assert code == 0 and re.search(r"layer1\.1 .*3x3 stage conv", out)
    code, out, _ = cli("list", "positions")
    assert code == 0 and "stage" in out and "conv" in out


# --------------------------------------------------------------------------- conv: the registry's rules


def test_kinds_and_natural_positions_come_from_the_registry():
    from attnsurgeon.blocks import REGISTRY

    assert (REGISTRY["sk"].kind, REGISTRY["sk"].position, REGISTRY["sk"].positions) == ("conv", "conv", ("conv",))
    assert (
        REGISTRY["se"].kind == "gate" and "conv" not in REGISTRY["se"].positions and "stage" in REGISTRY["se"].positions
    )
    assert (
        make_spec("sk").position == "conv"
        and make_spec("splat").position == "conv"
        and make_spec("se").position == "standard"
    )
    assert parse_insertion({"attn": "splat"}).position == "conv"
    assert InsertionSpec("se", replace=True).position == "standard"


@pytest.mark.parametrize(
    "attn, position, message",
    [
        (
            "se",
            "conv",
            r"se is a gate .* cannot take the place of a convolution: position 'conv' is for conv blocks \(sk, splat\)",
        ),
        ("cbam", "conv", "cbam is a gate"),
        (
            "sk",
            "standard",
            r"sk replaces the block's spatial convolution and goes only at position 'conv', not 'standard'",
        ),
        ("splat", "stage", "splat replaces the block's spatial convolution"),
    ],
)
def test_a_block_at_a_position_its_kind_does_not_allow_fails_before_any_model(attn, position, message):
    with pytest.raises(AttnSurgeonError, match=message):
        validate(InsertionSpec(attn, position))


def test_the_cli_refuses_them_in_one_line(cli):
    code, _, err = cli("insert", "resnet18", "--attn", "se", "--position", "conv")
    assert code == 2 and "cannot take the place of a convolution" in err and "Traceback" not in err
    code, _, err = cli("insert", "resnet18", "--attn", "sk", "--replace")
    assert code == 2 and "--replace is for gates" in err


@pytest.mark.slow
def test_conv_on_a_model_without_spatial_convs_is_a_clear_error():
    with pytest.raises(AttnSurgeonError, match=r"position 'conv' is not available .*no spatial \(k>1\) nn.Conv module"):
        attnsurgeon.insert("vit_b_16", "sk")


@pytest.mark.slow
def test_a_conv_the_block_cannot_split_is_a_clear_error():
    with pytest.raises(
        AttnSurgeonError, match=r"sk: the 3×3 conv 16→16, groups 16 has 16 groups.*set split_input false"
    ):
        attnsurgeon.insert("mobilenet_v3_large", "sk", blocks=["features.1"], input_size=SMALL)
    with pytest.raises(AttnSurgeonError, match=r"splat: .* not divisible by 32 \(16 groups × radix 2\)"):
        attnsurgeon.insert("mobilenet_v3_large", "splat", blocks=["features.1"], input_size=SMALL)
    # depthwise with the input unsplit: every path is a depthwise conv on all channels
    model, report = attnsurgeon.insert(
        "mobilenet_v3_large", "sk", blocks=["features.1"], split_input=False, input_size=SMALL
    )
    assert report.insertions[0].options["split_input"] is False
    assert model.get_submodule("features.1.block.0.0").paths[1].conv.groups == 16
    assert model.eval()(torch.randn(1, *SMALL)).shape == (1, 1000)


@pytest.mark.parametrize("attn", ["sk", "splat"])
def test_identity_init_of_a_conv_block_is_refused_with_the_reason(attn, resnet18):
    with pytest.raises(AttnSurgeonError, match=rf"{attn}: --init identity is impossible: .*never negative"):
        attnsurgeon.insert(resnet18(), attn, init="identity", input_size=SMALL)


# --------------------------------------------------------------------------- parity with timm


def _to_plain_resnet(key: str) -> str:
    """timm skresnet's ConvNormAct names (conv2.conv, conv2.bn) as timm resnet's (conv2, bn2)."""
    key = re.sub(r"\.conv(\d)\.conv\.", r".conv\1.", key)
    return re.sub(r"\.conv(\d)\.bn\.", r".bn\1.", key)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, sk_kwargs",
    [
        ("resnet18", dict(reduction=8, rd_divisor=16)),  # skresnet18's sk_kwargs: rd_ratio 1/8, rd_divisor 16
        ("resnet34", dict(reduction=8, rd_divisor=16)),
        ("resnet50", {}),  # skresnet50: timm's defaults
    ],
)
def test_sk_at_conv_builds_timms_skresnet(name, sk_kwargs):
    torch.manual_seed(0)
    reference = timm.create_model(f"sk{name}").eval()
    base = timm.create_model(name).eval()
    model, report = attnsurgeon.insert(base, "sk", input_size=SMALL, **sk_kwargs)
    # the same SK modules under the same names (conv1 of a basic block, conv2 of a bottleneck)
    ours = {n for n, m in model.named_modules() if isinstance(m, SelectiveKernel)}
    theirs = {n for n, m in reference.named_modules() if isinstance(m, SelectiveKernel)}
    assert ours == theirs and len(ours) == {"resnet18": 8, "resnet34": 16, "resnet50": 16}[name]
    # the SK takes the place of the conv with its BN and ReLU, as in timm's units: the same parameters
    assert count_params(model) == count_params(reference)
    assert {i.replaced for i in report.insertions} == {"Conv2d+BatchNorm2d+Identity+ReLU"}  # conv, bn, drop_block, act
    # ... and the same outputs given the same weights
    state = {_to_plain_resnet(k): v for k, v in reference.state_dict().items()}
    model.load_state_dict(state, strict=True)
    x = torch.randn(2, *SMALL)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference(x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_splat_at_conv_builds_timms_resnest_bottleneck():
    """timm's ResNeSt bottleneck (radix 2, without its avd pooling) is timm's resnet50 bottleneck
    with SplitAttn in the place of conv2 and its norm and activation: the same names otherwise."""
    torch.manual_seed(0)
    reference = ResNet(block=ResNestBottleneck, layers=[3, 4, 6, 3], block_args=dict(radix=2, avd=False)).eval()
    model, report = attnsurgeon.insert(timm.create_model("resnet50").eval(), "splat", input_size=SMALL)
    ours = {n for n, m in model.named_modules() if isinstance(m, SplitAttn)}
    assert ours == {n for n, m in reference.named_modules() if isinstance(m, SplitAttn)} and len(ours) == 16
    assert count_params(model) == count_params(reference)
    model.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, *SMALL)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference(x), rtol=1e-4, atol=1e-5)


def splat_params(cin, cout, k, groups=1, radix=2, reduction=4, divisor=8, bias=False):
    attn = max(32, int(cin * radix / reduction + divisor / 2) // divisor * divisor)
    conv = cout * radix * (cin // (groups * radix)) * k * k + (cout * radix if bias else 0)
    return (
        conv
        + 2 * cout * radix
        + attn * (cout // groups)
        + attn
        + 2 * attn
        + cout * radix * (attn // groups)
        + cout * radix
    )


def test_splat_in_a_basic_block_matches_the_formula_and_a_hand_built_split_attn(resnet18):
    torch.manual_seed(0)
    base = resnet18().eval()
    model, report = attnsurgeon.insert(base, "splat", input_size=SMALL)
    for ins in report.insertions:
        conv = base.get_submodule(ins.module)  # the base keeps its conv: the rewritten model has its own tree
        assert ins.params == splat_params(conv.in_channels, conv.out_channels, 3), ins.module
        bn = base.get_submodule(ins.module.replace("conv", "bn"))  # taken along with the conv (the ReLU has no weights)
        assert ins.replaced == "Conv2d+BatchNorm2d+ReLU" and ins.replaced_params == count_params(conv) + count_params(
            bn
        )
    assert report.params["delta"] == sum(i.params - i.replaced_params for i in report.insertions)
    # layer2.0.conv1: 64 -> 128, stride 2; timm's SplitAttn built by hand as ResNeSt builds it
    ours = model.get_submodule("layer2.0.conv1")
    ref = SplitAttn(64, 128, kernel_size=3, stride=2, padding=1, radix=2, norm_layer=nn.BatchNorm2d)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 64, 16, 16)
    with torch.no_grad():
        assert torch.equal(ours.eval()(x), ref.eval()(x))


def test_conv_blocks_keep_stride_and_stack_with_other_positions(resnet18):
    base = resnet18().eval()
    x = torch.randn(1, *SMALL)
    specs = [
        InsertionSpec("se", "pre", blocks=["layer2.0"]),
        InsertionSpec("sk", blocks=["layer2.0"]),
        InsertionSpec("eca", "3x3", blocks=["layer2.0"]),
    ]
    model, report = attnsurgeon.apply_plan(copy.deepcopy(base), specs, input_size=SMALL)
    assert [i.module for i in report.insertions] == ["layer2.0.se_pre", "layer2.0.conv1", "layer2.0.eca_3x3"]
    (sk,) = _calls(model, "layer2.0.conv1")
    assert sk.args[0].target == "layer2.0.se_pre"  # the SK reads what the pre block gives
    assert [u.target for u in sk.users] == ["layer2.0.eca_3x3"]  # SK took bn1 and relu along: the 3x3 site reads it
    assert not hasattr(model.get_submodule("layer2.0"), "bn1")
    assert model.get_submodule("layer2.0.conv1").paths[0].conv.stride == (2, 2)
    assert model(x).shape == (1, 1000)


# --------------------------------------------------------------------------- FLOPs


def sk_macs(cin, cout, h, w, hidden, paths=2):
    """SK in place of a conv, per image: the paths' 3×3 convs on half the input each, their BN
    (eval: 2 per element) and ReLU, the sum over paths, the pool, fc_reduce + BN + ReLU, fc_select,
    the softmax over paths, the weighting and the weighted sum."""
    hw = h * w
    convs = paths * cout * (cin // paths) * 9 * hw
    bn_relu = paths * 3 * cout * hw
    select = paths * cout * hw + cout * hw + cout * hidden + 3 * hidden + hidden * paths * cout + paths * cout
    mix = 2 * paths * cout * hw
    return convs + bn_relu + select + mix


def splat_macs(cin, cout, h, w, attn, radix=2):
    """SplitAttn: the conv (radix splits), BN + ReLU, the sum of the splits, the pool, fc1, BN + ReLU,
    fc2, the softmax, the weighting and the weighted sum (fvcore counts no conv bias)."""
    hw = h * w
    conv = cout * radix * (cin // radix) * 9 * hw
    return (
        conv
        + 3 * cout * radix * hw
        + radix * cout * hw
        + cout * hw
        + cout * attn
        + 3 * attn
        + attn * cout * radix
        + cout * radix
        + 2 * radix * cout * hw
    )


@pytest.mark.slow
@pytest.mark.parametrize("attn", ["sk", "splat"])
def test_conv_block_macs_match_the_formula_and_nothing_is_uncounted(attn):
    result = profile("resnet18", attn, stages=[3, 4], **FAST)
    assert result.uncounted_ops == {}
    assert result.unattributed_macs == 0
    # layer3 at 4x4 (64 px), layer4 at 2x2; the first block of each takes 128/256 channels, stride 2
    shapes = {
        "layer3.0.conv1": (128, 256, 4),
        "layer3.1.conv1": (256, 256, 4),
        "layer4.0.conv1": (256, 512, 2),
        "layer4.1.conv1": (512, 512, 2),
    }
    # the attention widths by the papers' rules as timm rounds them, not read back from the blocks: SK's
    # out/16 (a multiple of 8, here 16 or 32), ResNeSt's in·radix/4 (a multiple of 8, at least 32: 64 to 256)
    hidden = {
        "sk": lambda cin, cout: make_divisible(cout / 16, 8, round_limit=0.9),
        "splat": lambda cin, cout: make_divisible(cin * 2 / 4, 8, min_value=32),
    }[attn]
    assert sorted(ins.module for ins in result.insertions) == sorted(shapes)
    for ins in result.insertions:
        cin, cout, h = shapes[ins.module]
        new = (sk_macs if attn == "sk" else splat_macs)(cin, cout, h, h, hidden(cin, cout))
        # the row is the swap: new less the conv and the BN (2 per element in eval) and ReLU it took along
        assert ins.macs == new - cout * cin * 9 * h * h - 3 * cout * h * h, ins.module
    assert sum(i.macs for i in result.insertions) == result.modified.macs - result.base.macs


def test_training_a_conv_block_on_a_batch_of_one_is_a_clear_error():
    # SK's attention normalises its pooled (N, C, 1, 1) features: timm's skresnet cannot train on one image either
    with pytest.raises(AttnSurgeonError, match="train needs a batch of 2 or more"):
        profile("resnet18", "sk", blocks=["layer4.1"], mode="train", batch_sizes=[1], **FAST)
    from attnsurgeon.profiling import InsertionCost

    assert InsertionCost("layer4.1.conv1", "layer4.1", 4, "conv", "sk", 1, 1, "Conv2d").where == "conv: replaces Conv2d"


def test_a_replacement_that_would_change_the_conv_output_shape_is_refused():
    # unpadded 3×3 convs: SK pads its paths (timm's symmetric padding), splat keeps the conv's own padding
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU())
    _, anatomy = attnsurgeon.inspect_model(model, input_size=(3, 32, 32))
    second = anatomy.blocks[1].name
    with pytest.raises(
        AttnSurgeonError, match=r"sk built for the 3×3 conv 16→16 gives a .* output where the conv gives"
    ):
        attnsurgeon.insert(model, "sk", blocks=[second], input_size=(3, 32, 32))
    out, report = attnsurgeon.insert(model, "splat", blocks=[second], input_size=(3, 32, 32))
    assert out.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 16, 28, 28)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["convnext_tiny", "mobilenet_v3_large"])
def test_sk_replaces_depthwise_convs_with_the_input_unsplit(name):
    base = attnsurgeon.load_model(name).model.eval()
    model, report = attnsurgeon.insert(copy.deepcopy(base), "sk", stages=[2], split_input=False, input_size=SMALL)
    assert report.insertions and all(
        i.position == "conv" and i.replaced.split("+")[0] == "Conv2d" for i in report.insertions
    )
    for ins in report.insertions:
        old, new = base.get_submodule(ins.module), model.get_submodule(ins.module)
        assert isinstance(new, SelectiveKernel)
        assert all(p.conv.groups == old.groups == old.in_channels and p.conv.stride == old.stride for p in new.paths)
    assert model(torch.randn(2, *SMALL)).shape == (2, 1000)


@pytest.mark.slow
def test_stage_in_a_detector_feeds_the_next_stage_while_the_fpn_reads_the_raw_stage_output():
    model, report = attnsurgeon.insert("fasterrcnn_resnet50_fpn", "eca", "stage", input_size=128)
    assert [i.module for i in report.insertions] == [f"backbone.body.layer{k}.eca_stage" for k in (1, 2, 3)]
    for k in (1, 2, 3):
        (call,) = _calls(model.backbone, f"body.layer{k}.eca_stage")
        assert {u.target for u in call.users} == {f"body.layer{k + 1}.0.conv1", f"body.layer{k + 1}.0.downsample.0"}
        # the FPN's lateral conv still reads the stage's own output
        assert any(u.op == "call_module" and u.target.startswith("fpn.inner_blocks") for u in call.args[0].users)


def test_a_sweep_grid_leaves_out_what_a_blocks_kind_does_not_allow(cli, tmp_path):
    code, _, err = cli("sweep", "resnet18", "--attn", "sk,splat", "--position", "standard,pre", "--out", tmp_path / "s")
    assert code == 2 and "no block of --attn goes at any --position given (sk at standard, sk at pre" in err
