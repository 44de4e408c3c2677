"""The zoo's timm-backed blocks: what timm builds, the papers' parameter formulas, MACs by hand.

ese, ecam, ceca, ge, gc, gca, lcbam, coord, scoord, ela, strip, nl: each is compared with the module
timm's own ``create_attn(name, C)`` builds (the factory timm's hand-written models use), given the
same weights; its parameters with the formula of its docstring; its MACs (fvcore's unit plus
attnsurgeon's element-wise handles: 1 per produced element, reductions 1 per read element) with
the sum over its ops. Identity init and the insertion at every position are in test_zoo_matrix.py.
"""

from __future__ import annotations

import pytest
import torch
from timm.layers import create_attn, make_divisible

from attnsurgeon import AttnSurgeonError, insert
from attnsurgeon.blocks import build_block
from attnsurgeon.profiling.flops import count_macs

TIMM_BUILT = ["ese", "ecam", "ceca", "gc", "gca", "lcbam", "coord", "scoord", "ela", "strip", "nl"]


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", TIMM_BUILT)
@pytest.mark.parametrize("channels", [64, 200])
def test_equals_what_timm_builds(name, channels):
    """Same parameters (names and shapes) and the same outputs as timm's create_attn, given the same weights."""
    torch.manual_seed(0)
    ours = build_block(name, channels, size=(12, 10)).eval()
    theirs = create_attn(name, channels).eval()
    assert n_params(ours) == n_params(theirs)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, channels, 12, 10)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["ese", "ecam", "ceca", "gc", "gca", "nl"])
@pytest.mark.parametrize("size", [(48,), (3, 5, 4)])
def test_channel_blocks_on_1d_and_3d_maps_are_timms_on_the_flattened_map(name, size):
    torch.manual_seed(0)
    ours = build_block(name, 64, size=size).eval()
    theirs = create_attn(name, 64).eval()
    theirs.load_state_dict(ours.block.state_dict(), strict=True)
    x = torch.randn(2, 64, *size)
    want = theirs(x.reshape(2, 64, -1, 1)).reshape(x.shape)
    torch.testing.assert_close(ours(x), want, rtol=1e-6, atol=1e-6)


def rd(c: int, ratio: float, divisor: int, limit: float = 0.0) -> int:
    return int(make_divisible(c * ratio, divisor, round_limit=limit))


def eca_k(c: int) -> int:  # ECA's adaptive kernel (gamma 2, b 1)
    import math

    t = int(abs(math.log(c, 2) + 1) / 2)
    return max(t if t % 2 else t + 1, 3)


PARAMS = {  # the docstrings' formulas
    "ese": lambda c: c * c + c,
    "ecam": lambda c: 2 * rd(c, 1 / 8, 8, 0.9) + rd(c, 1 / 8, 8, 0.9) * eca_k(c) + 1,
    "ceca": lambda c: eca_k(c),
    "ge": lambda c: 2 * c * rd(c, 1 / 16, 1) + rd(c, 1 / 16, 1) + c,
    "gc": lambda c: c + 1 + 2 * c * rd(c, 1 / 8, 1) + 3 * rd(c, 1 / 8, 1) + c,
    "gca": lambda c: c + 1 + 2 * c * rd(c, 1 / 8, 1) + 3 * rd(c, 1 / 8, 1) + c,
    "lcbam": lambda c: 2 * c * rd(c, 1 / 16, 1) + 7 * 7 + 2,
    "coord": lambda c: 3 * c * rd(c, 2 / 3 / 16, 8) + 2 * rd(c, 2 / 3 / 16, 8),
    "scoord": lambda c: 3 * c * rd(c, 2 / 3 / 4, 8) + rd(c, 2 / 3 / 4, 8) + 2 * c,
    "ela": lambda c: 2 * c * 7 + 4 * c,
    "strip": lambda c: 2 * c * 3,
    "nl": lambda c: 4 * c * rd(c, 1 / 8, 8, 0.9) + 3 * rd(c, 1 / 8, 8, 0.9) + c + 2 * c,
}


@pytest.mark.parametrize("name", list(PARAMS))
@pytest.mark.parametrize("channels", [24, 64, 200, 512])
def test_parameters_follow_the_formula(name, channels):
    assert n_params(build_block(name, channels, size=(7, 7))) == PARAMS[name](channels)


def macs(name: str, c: int, h: int, w: int) -> int:
    """MACs of one block on a C×H×W map, op by op (mean/amax read every element, pointwise ops count
    what they produce, convs and matmuls their multiply-adds)."""
    n = h * w
    if name == "ese":  # mean, 1×1 conv C→C, hard-sigmoid, x·gate
        return c * n + c * c + c + c * n
    if name == "ceca":  # mean, k-tap conv across C, sigmoid, x·gate
        return c * n + c * eca_k(c) + c + c * n
    if name == "ecam":  # mean, 1→rd conv, ReLU, rd→1 k-tap conv, sigmoid, x·gate
        r = rd(c, 1 / 8, 8, 0.9)
        return c * n + c * r + r * c + c * r * eca_k(c) + c + c * n
    if name == "ge":  # the global GE: SE with timm's divisor 1 (mean, fc1, ReLU, fc2, sigmoid, x·gate)
        r = rd(c, 1 / 16, 1)
        return c * n + c * r + r + r * c + c + c * n
    if name == "strip":  # row/column means, two k-tap depthwise convs, their broadcast sum, sigmoid, x·gate
        return c * n + c * n + 3 * c * h + 3 * c * w + c * n + c * n + c * n
    if name == "nl":  # θ, φ, g 1×1 convs, θᵀφ, ×scale, softmax, ·g, z conv, BN (eval: 2 per element), + x
        r = rd(c, 1 / 8, 8, 0.9)
        return 3 * c * r * n + n * n * r + n * n + n * n + n * n * r + r * c * n + 2 * c * n + c * n
    raise KeyError(name)


@pytest.mark.parametrize("name", ["ese", "ceca", "ecam", "ge", "strip", "nl"])
def test_macs_follow_the_formula(name):
    c, h, w = 64, 12, 10
    m = build_block(name, c, size=(h, w)).eval()
    counted = count_macs(m, torch.randn(1, c, h, w))
    assert counted.uncounted == {}
    assert counted.macs == macs(name, c, h, w)


def test_gather_excite_with_extent_and_parameters():
    """GE-θ⁻ with extent 2 is average pooling over 3×3 windows with stride 2 (timm's gather), upsampled;
    GE-θ's depthwise gather adds log2(e) × (9C + 2C) parameters, or H·W·C + 2C for the global extent."""
    c = 64
    base = PARAMS["ge"](c)
    assert n_params(build_block("ge", c, size=(8, 8), extent=4, extra_params=True)) == base + 2 * (9 * c + 2 * c)
    assert n_params(build_block("ge", c, size=(8, 6), extent=0, extra_params=True)) == base + 8 * 6 * c + 2 * c
    torch.manual_seed(0)
    m = build_block("ge", c, size=(8, 8), extent=2).eval()
    x = torch.randn(1, c, 8, 8)
    pooled = torch.nn.functional.avg_pool2d(x, 3, 2, 1, count_include_pad=False)
    gate = torch.sigmoid(m.mlp(pooled))
    want = x * torch.nn.functional.interpolate(gate, size=(8, 8))
    torch.testing.assert_close(m(x), want)
    with pytest.raises(AttnSurgeonError, match="extent 8 is larger than the 4×4"):
        build_block("ge", c, size=(4, 4), extent=8)
    with pytest.raises(AttnSurgeonError, match="extent"):
        build_block("ge", c, size=(8, 8), extent=3)


@pytest.mark.parametrize("name", ["coord", "scoord", "ela", "strip", "lcbam"])
def test_2d_blocks_refuse_tokens_and_video_clearly(name):
    for size in [(16,), (4, 8, 8)]:
        with pytest.raises(AttnSurgeonError, match=rf"^{name} needs a 2-D \(H, W\) feature map"):
            build_block(name, 64, size=size)


def test_a_kernel_longer_than_the_map_is_refused_before_the_model_changes(resnet18):
    model = resnet18()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AttnSurgeonError, match="ela: kernel_size 99 is larger than"):
        insert(model, "ela", kernel_size=99, input_size=(3, 64, 64))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and type(model.layer1[0].bn2).__name__ == "BatchNorm2d"


def test_the_zoo_in_a_real_model_reports_its_options(resnet18):
    """insert resnet18 with ge extent 2: the report says what was built (timm's rounding of the hidden width)."""
    model, report = insert(resnet18(), "ge", stages=[1], extent=2, input_size=(3, 64, 64))
    assert [i.module for i in report.insertions] == ["layer1.0.ge", "layer1.1.ge"]
    assert report.insertions[0].options == {"extent": 2, "extra_params": False, "reduction": 16, "hidden": 4}
    assert report.params["delta"] == 2 * PARAMS["ge"](64)
