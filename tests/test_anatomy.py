"""Anatomy: blocks, stages, channels, layouts and positions read from the traced graph."""

import pytest
from torch import nn

from attnsurgeon import AttnSurgeonError, inspect_model

SMALL = (3, 64, 64)


@pytest.mark.slow
def test_resnet50_stages_blocks_and_sites():
    _, a = inspect_model("resnet50", input_size=SMALL)
    assert [s.name for s in a.stages] == ["layer1", "layer2", "layer3", "layer4"]
    assert [len(s.blocks) for s in a.stages] == [3, 4, 6, 3]
    assert a.grouping == "containers" and a.shape_mode == "meta"
    b = a.block("layer2.0")
    assert (b.kind, b.type, b.skip, b.channels, b.resolution) == ("residual", "Bottleneck", "projection", 512, (8, 8))
    assert b.positions == ["standard", "pre", "post", "identity", "3x3", "conv"]
    assert a.block("layer2.3").positions == [
        "standard",
        "pre",
        "post",
        "identity",
        "3x3",
        "stage",
        "conv",
    ]  # ends stage 2
    # per-site channels: block input 256, bottleneck width 128 after the 3x3 conv, output 512
    assert {p: s.channels for p, s in b.sites.items()} == {
        "standard": 512,
        "pre": 256,
        "post": 512,
        "identity": 512,
        "3x3": 128,
        "conv": 128,
    }
    assert a.block("layer2.1").skip == "identity"


def test_basic_block_and_resolution_at_input_size():
    _, a = inspect_model("resnet18", input_size=(3, 96, 96))
    assert [(s.blocks[0].channels, s.blocks[0].resolution) for s in a.stages] == [
        (64, (24, 24)),
        (128, (12, 12)),
        (256, (6, 6)),
        (512, (3, 3)),
    ]
    assert a.block("layer1.0").sites["3x3"].channels == 64


def test_mobilenet_v2_plain_and_residual_blocks_grouped_by_resolution():
    _, a = inspect_model("mobilenet_v2", input_size=SMALL)
    names = [b.name for b in a.blocks]
    assert names == [f"features.{i}" for i in range(1, 18)]
    assert a.block("features.1").kind == "plain" and "identity" not in a.block("features.1").positions
    assert a.block("features.3").kind == "residual" and a.block("features.3").skip == "identity"
    assert a.grouping == "resolution"
    assert [len(s.blocks) for s in a.stages] == [1, 2, 3, 7, 4]
    assert a.block("features.3").sites["3x3"].channels == 144  # after the depthwise conv: 24 * 6


def test_timm_efficientnet_finds_its_depthwise_first_stage_and_existing_se():
    _, a = inspect_model("timm:efficientnet_b0", input_size=SMALL)
    assert [s.name for s in a.stages] == [f"blocks.{i}" for i in range(7)]
    assert a.block("blocks.0.0").type == "DepthwiseSeparableConv"
    se = dict(a.existing_attention)
    assert se["blocks.0.0.se"] == "SqueezeExcite" and len(se) == 16


def test_existing_attention_in_torchvision_models():
    _, a = inspect_model("mobilenet_v3_large", input_size=SMALL)
    assert ("features.4.block.2", "SqueezeExcitation") in a.existing_attention
    _, r = inspect_model("regnet_y_400mf", input_size=SMALL)
    assert len(r.existing_attention) == 16


@pytest.mark.slow
def test_convnext_blocks_and_timm_stage_names():
    _, a = inspect_model("timm:convnext_tiny", input_size=SMALL)
    assert [s.name for s in a.stages] == ["stages.0", "stages.1", "stages.2", "stages.3"]
    assert [len(s.blocks) for s in a.stages] == [3, 3, 9, 3]
    assert all(b.layout == "NCHW" and b.skip == "identity" for b in a.blocks)


@pytest.mark.slow
def test_plain_cnns_are_split_into_conv_units():
    _, vgg = inspect_model("vgg11", input_size=SMALL)
    assert [b.name for b in vgg.blocks] == [
        "features.0",
        "features.3",
        "features.6",
        "features.8",
        "features.11",
        "features.13",
        "features.16",
        "features.18",
    ]
    assert [len(s.blocks) for s in vgg.stages] == [1, 1, 2, 2, 2]
    _, dn = inspect_model("densenet121", input_size=SMALL)
    assert len(dn.blocks) == 1 + 6 + 12 + 24 + 16 and all(b.kind == "unit" for b in dn.blocks)


class _Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: not traceable
            return x
        return -x


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.gate = _Gate()

    def forward(self, x):
        return self.gate(self.conv(x))


def test_untraceable_model_names_the_module_and_line():
    with pytest.raises(AttnSurgeonError) as err:
        inspect_model(_Untraceable(), input_size=SMALL)
    text = str(err.value)
    assert "module 'gate' (_Gate)" in text and "if x.sum() > 0" in text and "test_anatomy.py" in text


def test_wrong_input_size_is_a_clear_error(resnet18):
    with pytest.raises(AttnSurgeonError, match="input size"):
        inspect_model(resnet18(), input_size="3,x,4")
    with pytest.raises(AttnSurgeonError, match="does not run on an input of shape"):
        inspect_model(resnet18(), input_size=(1, 64, 64))  # a 3-channel stem given 1 channel
