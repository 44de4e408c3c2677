"""timm families that used to fail: tiny blocks (the block's own rounding rule), opaque blocks
under the default selection (skipped with a note), positional-encoding adds (not blocks) and
models whose forward takes optional inputs (hiera's ``mask=None``)."""

import json

import pytest
import torch
from timm.layers import SEModule
from timm.layers.cbam import CbamModule
from timm.models.csatv2 import Block as CsatBlock
from timm.models.csatv2 import TransformerBlock as CsatTransformerBlock
from torch import nn

import attnsurgeon
from attnsurgeon import AttnSurgeonError, insert
from attnsurgeon.graph.anatomy import analyse
from attnsurgeon.graph.finders import find_blocks
from attnsurgeon.graph.tracing import trace
from attnsurgeon.rewriting.surgery import count_params

SMALL = (3, 64, 64)
TINY = ["ghostnet_050", "mobilenetv3_small_050", "repghostnet_050", "efficientvit_b0", "test_efficientnet"]


@pytest.mark.slow
@pytest.mark.parametrize("name", TINY)
def test_tiny_blocks_get_the_hidden_width_timms_se_gives_them(name):
    model, report = insert(f"timm:{name}", "se", input_size=SMALL)
    assert report.insertions and not [n for n in report.notes if "skipped" in n]
    assert min(i.channels for i in report.insertions) < 16  # a block narrower than the reduction is in it
    for ins in report.insertions:
        reference = SEModule(ins.channels, rd_ratio=1 / 16)  # timm's own rounding: hidden width ≥ 8
        assert ins.options["hidden"] == reference.fc1.out_channels
        assert ins.params == count_params(reference)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, *SMALL)).shape == (1, 1000)


def test_tiny_blocks_get_the_hidden_width_timms_cbam_gives_them():
    _, report = insert("timm:mobilenetv3_small_050", "cbam", input_size=SMALL)
    assert min(i.channels for i in report.insertions) == 8  # 8 / 16 rounds to 1 hidden unit (divisor 1)
    for ins in report.insertions:
        reference = CbamModule(ins.channels)
        assert ins.options["hidden"] == reference.channel.fc1.out_channels
        assert ins.params == count_params(reference)


def test_a_reduction_larger_than_the_channels_rounds_as_timm_does(resnet18):
    _, report = insert(resnet18(), "se", reduction=1000, stages=[1], input_size=SMALL)
    assert {i.options["hidden"] for i in report.insertions} == {SEModule(64, rd_ratio=1 / 1000).fc1.out_channels} == {8}


# --------------------------------------------------------------------------- opaque blocks


@pytest.mark.slow
def test_default_selection_skips_opaque_blocks_with_a_note(cli):
    _, report = insert("timm:mobilevit_xxs", "se", input_size=SMALL)
    opaque = ["stages.2.1", "stages.3.1", "stages.4.1"]  # timm's MobileVitBlock, registered not traceable
    inserted = [i.block for i in report.insertions]
    assert inserted == [
        "stages.0.0",
        "stages.1.0",
        "stages.1.1",
        "stages.1.2",
        "stages.2.0",
        "stages.3.0",
        "stages.4.0",
    ]
    (note,) = [n for n in report.notes if "skipped" in n]
    assert all(b in note for b in opaque) and "position 'standard' is not available" in note

    code, out, err = cli("insert", "timm:mobilevit_xxs", "--input-size", "64")
    assert code == 0 and "7 blocks inserted" in out and "note: se skipped 3 blocks" in err
    code, out, _ = cli("insert", "timm:mobilevit_xxs", "--input-size", "64", "--json")
    assert code == 0 and json.loads(out)["notes"] == report.notes


@pytest.mark.slow
def test_a_block_named_explicitly_that_cannot_take_the_position_is_an_error(cli):
    with pytest.raises(
        AttnSurgeonError,
        match=r"position 'standard' is not available in block stages\.2\.1 \(opaque.*"
        r"1 of the 2 selected blocks offer it: leave the others out of --blocks",
    ):
        insert("timm:mobilevit_xxs", "se", blocks=["stages.2.*"], input_size=SMALL)
    code, out, err = cli("insert", "timm:mobilevit_xxs", "--blocks", "stages.3.1", "--input-size", "64")
    assert code == 2 and "not available in block stages.3.1" in err and "Traceback" not in err and out == ""
    # pre and post do reach an opaque block
    _, report = insert("timm:mobilevit_xxs", "se", "post", blocks=["stages.3.1"], input_size=SMALL)
    assert [i.block for i in report.insertions] == ["stages.3.1"] and report.params["delta"] == count_params(
        SEModule(64)
    )


@pytest.mark.slow
def test_a_stages_selection_skips_with_a_note_and_fails_only_when_nothing_fits():
    _, report = insert("timm:mobilevit_xxs", "se", stages=[3], input_size=SMALL)
    assert [i.block for i in report.insertions] == ["stages.2.0"]
    assert any("skipped 1 block (stages.2.1)" in n for n in report.notes)
    with pytest.raises(
        AttnSurgeonError, match=r"position 'identity' is not available in blocks stages\.2\.0, stages\.2\.1"
    ):
        insert("timm:mobilevit_xxs", "se", "identity", stages=[3], input_size=SMALL)


def test_a_block_the_attention_cannot_be_built_for_is_skipped_unless_named(resnet18):
    # resnet18's first stage has 64 channels: ECA with kernel 127 cannot be built there (128 and up can)
    _, report = insert(resnet18(), "eca", kernel_size=127, input_size=SMALL)
    assert {i.stage for i in report.insertions} == {2, 3, 4}
    skipped = [n for n in report.notes if "skipped" in n]
    assert skipped == [
        f"eca skipped block layer1.{k} (64 channels at 'standard'): eca: kernel size 127 is larger than "
        "the 64 channels here"
        for k in (0, 1)
    ]
    with pytest.raises(AttnSurgeonError, match=r"block layer1\.0 \(64 channels at 'standard'\): eca: kernel size 127"):
        insert(resnet18(), "eca", kernel_size=127, blocks=["layer1.0", "layer4.*"], input_size=SMALL)
    with pytest.raises(AttnSurgeonError, match=r"block layer1\.0 \(64 channels at 'standard'\): eca: kernel size 1001"):
        insert(resnet18(), "eca", kernel_size=1001, input_size=SMALL)  # fits nowhere: an error


@pytest.mark.slow
def test_the_skip_survives_save_and_load(tmp_path):
    model, report = insert("timm:mobilevit_xxs", "se", input_size=SMALL)
    attnsurgeon.export(model, tmp_path / "m.safetensors")
    again = attnsurgeon.load(tmp_path / "m.safetensors")
    assert [i.block for i in again.attnsurgeon_report.insertions] == [i.block for i in report.insertions]


# --------------------------------------------------------------------------- positional-encoding adds


class _CsatLike(nn.Module):
    """timm's own CSATv2 blocks: a ConvNeXt-style block whose spatial attention runs a 1-channel
    transformer (with a PosConv ``x + dwconv(x)``), then a transformer block with a PosConv."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, stride=4)
        self.stages = nn.Sequential(
            nn.Sequential(CsatBlock(16), CsatTransformerBlock(16, 16, num_heads=2, attn_head_dim=8))
        )

    def forward(self, x):
        return self.stages(self.stem(x)).mean((2, 3))


class _ConvMixerLike(nn.Module):
    """ConvMixer's residual: depthwise conv, GELU, BN — nonlinear, so a block."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, stride=4)
        self.mix = nn.Sequential(nn.Conv2d(16, 16, 7, padding=3, groups=16), nn.GELU(), nn.BatchNorm2d(16))

    def forward(self, x):
        x = self.stem(x)
        return x + self.mix(x)


def _blocks(model):
    gm = trace(model.eval())
    analyse(gm, SMALL)
    return [(b.name, b.channels) for b in find_blocks(gm)]


def test_positional_encoding_adds_and_one_channel_maps_are_not_blocks():
    blocks = _blocks(_CsatLike())
    # before: stages.0.0.attn.attn.pos_embed, stages.0.0.attn.attn#1/#2 (1 channel), stages.0.1.pos_embed
    # were blocks too
    assert blocks == [("stages.0.0", 16), ("stages.0.1#1", 16), ("stages.0.1#2", 16)]
    assert _blocks(_ConvMixerLike()) == [("add", 16)]


# --------------------------------------------------------------------------- optional forward inputs


class _OptionalInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())

    def forward(self, x, mask=None, scale: float = 2.0, flip: bool = False):
        x = self.conv(x)
        if mask is not None:
            x = x * mask
        if flip:
            x = x.flip(-1)
        return (x + self.block(x)) * scale


def test_optional_forward_inputs_are_traced_at_their_defaults():
    model = _OptionalInputs().eval()
    gm = trace(model)
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == ["x"]
    x = torch.randn(2, *SMALL)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_hiera_inserts_and_runs():
    # forward(x, mask=None); one block per stage instead of (1, 2, 7, 2) keeps the build fast
    loaded = attnsurgeon.load_model("timm:hiera_tiny_224", img_size=64, stages=(1, 1, 1, 1))
    with torch.no_grad():
        nn.init.normal_(loaded.model.head.fc.weight, std=0.02)  # timm zero-inits the head: make outputs tell
    base = loaded.model.eval()
    x = torch.randn(1, *SMALL)
    with torch.no_grad():
        expected = base(x)
        model, report = insert(loaded, "se", init="identity", input_size=SMALL)
        assert [i.block for i in report.insertions] == [f"blocks.{k}#{m}" for k in range(4) for m in (1, 2)]
        torch.testing.assert_close(model.eval()(x), expected, rtol=1e-5, atol=1e-5)
        for ins in report.insertions:  # the inserted blocks are on the live path
            model.get_submodule(ins.module).fc2.bias.add_(1.0)
        assert not torch.allclose(model(x), expected)
