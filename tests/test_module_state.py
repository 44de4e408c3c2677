"""core.module_state: what a forward leaves on its modules, taken away and put back."""

import torch
from torch import nn

from attnsurgeon.core.module_state import snapshot


class Head(nn.Module):
    """Keeps what it computed from its input on itself, as YOLO's Detect head keeps its anchors."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.shape = None

    def forward(self, x):
        if self.shape != x.shape:
            self.anchors = torch.arange(x.shape[-1], dtype=x.dtype)
            self.shape = x.shape
        return self.conv(x) + self.anchors


def test_changes_restore_and_as_taken():
    model = nn.Sequential(nn.Identity(), Head())
    head = model[1]
    as_built = snapshot(model)
    assert as_built.changes() == []
    model(torch.randn(1, 3, 4, 4))
    assert sorted(key for _, key, _ in as_built.changes()) == ["anchors", "shape"]
    assert {name for name, _, _ in as_built.changes()} == {"1"}
    run = (head.shape, head.anchors)
    with as_built.as_taken():
        assert head.shape is None and not hasattr(head, "anchors")
        head.extra = 1  # what the code within writes is gone afterwards too
        model(torch.randn(2, 3, 8, 8))
    assert (head.shape, head.anchors) == run and not hasattr(head, "extra")
    assert len(as_built.restore()) == 2
    assert head.shape is None and not hasattr(head, "anchors") and as_built.changes() == []


def test_the_mode_is_the_callers_and_a_deleted_attribute_comes_back():
    model = Head()
    as_built = snapshot(model)
    model.eval()
    del model.shape
    as_built.restore()
    assert model.training is False  # eval() after the snapshot stays: a setting, not a forward's trace
    assert model.shape is None


def test_a_module_shared_by_two_models_is_recorded_once():
    head = Head()
    a, b = nn.Sequential(head), nn.Sequential(nn.Identity(), head)
    assert sum(m is head for _, m, _ in snapshot(a, b, None).modules) == 1
