"""The tracer iterates what the shapes fix (chunk/split/unbind, a slice of a shape), decides
conditions on shapes and dtypes, keeps a model's own output type, and refuses side effects."""

import pytest
import torch
from torch import nn

from attnsurgeon import AttnSurgeonError
from attnsurgeon.graph.tracing import trace


class Splits(nn.Module):
    """Iterations fx cannot trace: list(chunk), a loop over split, a starred shape."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 1)

    def forward(self, x):
        y = self.conv(x)
        parts = list(y.chunk(3, 1))  # 8 channels in chunks of 3: 3 pieces (3, 3, 2)
        total = sum(p.mean(1, keepdim=True) for p in y.split(5, 1))  # 2 pieces (5, 3)
        flat = y.reshape(*y.shape[:-2], -1)
        rows = [r.sum() for r in flat.unbind(1)]  # 8 pieces
        return torch.cat(parts, 1) * total + torch.stack(rows).sum() + flat.mean()


def test_iteration_counts_come_from_the_shapes():
    model = Splits().eval()
    gm = trace(model, (4, 5, 6))
    x = torch.randn(2, 4, 5, 6)
    torch.testing.assert_close(gm(x), model(x))
    getitems = [n for n in gm.graph.nodes if n.op == "call_function" and n.target.__name__ == "getitem"]
    # chunk -> 3 pieces (not the 3 asked for by coincidence: 8 channels in chunks of 3 are 3), split -> 2, unbind -> 8
    chunk = next(n for n in gm.graph.nodes if n.op == "call_method" and n.target == "chunk")
    split = next(n for n in gm.graph.nodes if n.op == "call_method" and n.target == "split")
    unbind = next(n for n in gm.graph.nodes if n.op == "call_method" and n.target == "unbind")
    assert [len([u for u in n.users]) for n in (chunk, split, unbind)] == [
        len(y) for y in (torch.randn(8).chunk(3), torch.randn(8).split(5), torch.randn(2, 8).unbind(1))
    ]
    assert getitems


class ChunkOfFour(nn.Module):
    def forward(self, x):
        return torch.cat([p * (i + 1) for i, p in enumerate(x.chunk(3, 1))], 1)  # 4 channels: 2 pieces


def test_chunk_count_is_the_real_one_not_the_argument():
    gm = trace(ChunkOfFour(), (4, 3, 3))
    x = torch.randn(1, 4, 3, 3)
    torch.testing.assert_close(gm(x), ChunkOfFour()(x))  # 3 pieces would have broken the weights 1, 2


class OverBatch(nn.Module):
    def forward(self, x):
        return torch.stack([s * 2 for s in x.unbind(0)])  # as many pieces as samples: follows the batch


def test_a_count_that_follows_the_batch_is_refused():
    with pytest.raises(AttnSurgeonError, match="cannot be iterated"):
        trace(OverBatch(), (3, 4, 4))


class Cache(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.anchors = None

    def forward(self, x):
        if self.anchors is None or self.anchors.shape != x.shape:  # decided on shapes
            self.anchors = torch.zeros_like(x)  # a cache written on the module
        return self.conv(x) + self.anchors


def test_a_forward_that_stores_tensors_on_its_module_is_refused_and_the_module_left_as_it_was():
    model = Cache()
    with pytest.raises(AttnSurgeonError, match="stores a traced value on module"):
        trace(model, (3, 4, 4))
    assert model.anchors is None


def test_yolo_c2f_traces_and_its_bottlenecks_are_residual_blocks():
    pytest.importorskip("ultralytics")
    from ultralytics.nn.modules.block import C2f

    from attnsurgeon.graph.anatomy import analyse

    c2f = C2f(16, 16, n=2, shortcut=True).eval()
    gm = trace(c2f, (16, 8, 8))
    x = torch.randn(2, 16, 8, 8)
    torch.testing.assert_close(gm(x), c2f(x))
    blocks = analyse(gm, (16, 8, 8)).blocks
    assert [(b.name, b.kind) for b in blocks] == [("m.0", "residual"), ("m.1", "residual")]


def test_hugging_face_output_type_is_kept():
    pytest.importorskip("transformers")
    from transformers import ViTConfig, ViTForImageClassification

    vit = ViTForImageClassification(
        ViTConfig(
            num_hidden_layers=1,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
        )
    ).eval()
    gm = trace(vit, (3, 16, 16))  # decorated forward, **kwargs, `if pixel_values.dtype != ...`, `q_len > 1`
    x = torch.randn(2, 3, 16, 16)
    out = gm(x)
    assert type(out) is type(vit(x))
    torch.testing.assert_close(out.logits, vit(x).logits)
