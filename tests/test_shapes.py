"""The meta shape pass (attnsurgeon.graph.shapes): norms and activations whose output is like their input are
not run there (graph.shapes.SAME_SHAPE), and every recorded shape is the one running them gives."""

import pytest
import timm
import torch
import torchvision
from torch import nn

from attnsurgeon import AttnSurgeonError
from attnsurgeon.graph import shapes
from attnsurgeon.graph.tracing import trace


def _shapes(gm, size, monkeypatch=None):
    if monkeypatch is not None:
        monkeypatch.setattr(shapes, "SAME_SHAPE", {})  # every module run on the meta device
    assert shapes.propagate_shapes(gm, size) == "meta"
    return {n.name: shapes.shape_of(n) for n in gm.graph.nodes}


class _Mixed(nn.Module):
    """BatchNorm1d on 2-D and 3-D input, GroupNorm, LayerNorm over two axes, GELU."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.gn, self.bn1 = nn.GroupNorm(2, 8), nn.BatchNorm1d(8)
        self.ln, self.act, self.bn_seq = nn.LayerNorm([6, 6]), nn.GELU(), nn.BatchNorm1d(8)

    def forward(self, x):
        y = self.act(self.ln(self.gn(self.conv(x))))
        return self.bn1(y.mean((2, 3))), self.bn_seq(y.flatten(2))


@pytest.mark.parametrize(
    "build, size",
    [
        (lambda: _Mixed(), (3, 8, 8)),
        (lambda: torchvision.models.resnet18(), (3, 32, 32)),
        (lambda: timm.create_model("vit_tiny_patch16_224", img_size=32), (3, 32, 32)),
        (lambda: torchvision.models.mobilenet_v3_small(), (3, 32, 32)),
    ],
)
def test_the_shapes_are_those_of_running_every_module(build, size, monkeypatch):
    torch.manual_seed(0)
    gm = trace(build())
    skipped = [
        n for n in gm.graph.nodes if n.op == "call_module" and type(gm.get_submodule(n.target)) in shapes.SAME_SHAPE
    ]
    assert skipped
    fast = _shapes(gm, size)
    assert fast == _shapes(gm, size, monkeypatch)


def test_a_norm_of_the_wrong_width_still_fails_the_pass():
    gm = trace(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(4)))
    with pytest.raises(AttnSurgeonError, match="does not run on an input of shape"):
        shapes.propagate_shapes(gm, (3, 8, 8))


class _Pooled(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x).mean((2, 3))


def test_only_the_exact_types_with_their_checks_holding_are_not_run():
    x = torch.empty(1, 8, 4, 4, device="meta")
    assert shapes._like_input(nn.BatchNorm2d(8), (x,), {})
    assert not shapes._like_input(_Pooled(8), (x,), {})  # a subclass may change the shape: it runs
    assert not shapes._like_input(nn.BatchNorm2d(4), (x,), {})  # the wrong width: run, to fail as it would
    assert not shapes._like_input(nn.BatchNorm1d(8), (x,), {})  # the wrong rank
    assert not shapes._like_input(nn.BatchNorm2d(8).double(), (x,), {})  # another dtype
    assert not shapes._like_input(nn.LayerNorm(5), (x,), {})
    assert shapes._like_input(nn.LayerNorm([4, 4]), (x,), {})
