"""Tensors a forward computes from Python numbers at trace time (Swin's relative-position index,
BEiT's tables, EVA-02's and DINOv3's rotary embeddings) become ``_tensor_constantN`` attributes of
the traced graph: the GraphModule the rewrite runs on must hold them, through every copy, pickle,
export and the ``.safetensors`` + recipe round trip (issue 31: they were taken off the model with
the rest of what tracing wrote, and every such model ended in an internal error)."""

from __future__ import annotations

import copy
import pickle
import textwrap

import pytest
import torch

import attnsurgeon
from attnsurgeon.graph.inspect import inspect_model
from attnsurgeon.saving.export import export
from attnsurgeon.saving.saved import load

TABLED = textwrap.dedent('''
    import torch
    from torch import nn


    class Tabled(nn.Module):
        """A residual block and a bias table built from the window size in forward, as Swin builds its
        relative positions: ``torch.arange`` of Python ints is a real tensor during tracing."""

        def __init__(self, window=8):
            super().__init__()
            self.window = window
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.table_mlp = nn.Sequential(nn.Conv2d(2, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 1))
            self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            x = self.stem(x)
            rows, cols = torch.meshgrid(torch.arange(self.window), torch.arange(self.window), indexing="ij")
            coords = torch.stack([rows, cols]).float()[None] / self.window
            x = x + self.body(x) + self.table_mlp(coords)
            return self.head(x.mean((2, 3)))


    def build():
        torch.manual_seed(0)
        model = Tabled()
        for m in model.modules():  # BN statistics that are not the identity, so a lost block shows
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
        return model
''')
SIZE = (3, 8, 8)


@pytest.fixture
def spec(tmp_path, monkeypatch):
    (tmp_path / "tabled.py").write_text(TABLED)
    monkeypatch.chdir(tmp_path)
    return "tabled.py:build"


def _base(spec):
    from attnsurgeon.loading.models import build_model

    return build_model(spec).model.eval()


def test_a_table_built_in_forward_survives_the_rewrite(spec):
    base = _base(spec)
    x = torch.randn(2, *SIZE)
    gm, report = attnsurgeon.insert(spec, attn="se", init="identity", input_size=SIZE)
    assert len(report.insertions) == 1  # the one residual block
    constants = [name for name, _ in gm.named_buffers() if name.startswith("_tensor_constant")]
    assert constants, "the trace made no constant: the test model no longer tests anything"
    with torch.no_grad():
        assert torch.equal(gm.eval()(x), base(x))  # identity init: exactly the base model
    assert not any(k.startswith("_tensor_constant") for k in vars(base)), "the user's model is left as it was"


def test_a_block_fed_by_the_table_and_every_copy_keep_the_constant(spec, tmp_path):
    base = _base(spec)
    x = torch.randn(2, *SIZE)
    gm, report = attnsurgeon.insert(spec, attn="se", before="table_mlp.2", input_size=SIZE)
    (site,) = report.insertions
    assert (site.anchor, site.position, site.channels) == ("table_mlp.2", "before", 8)
    gm.eval()
    with torch.no_grad():
        y = gm(x)
        assert y.shape == base(x).shape
        for p in gm.get_submodule(site.module).parameters():  # a gate that is not ~0.5 everywhere
            torch.nn.init.normal_(p, std=2.0)
        y = gm(x)
        assert not torch.allclose(y, base(x)), "the block fed by the table is in the data flow"
        assert torch.equal(copy.deepcopy(gm)(x), y)
        assert torch.equal(pickle.loads(pickle.dumps(gm))(x), y)
    for ext in ("safetensors", "pt2", "ts"):
        written = export(gm, tmp_path / f"m.{ext}")
        assert written.max_abs_diff <= 1e-5
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "m.safetensors")(x), y)
        assert torch.allclose(torch.export.load(str(tmp_path / "m.pt2")).module()(x), y, atol=1e-5)
        assert torch.allclose(torch.jit.load(str(tmp_path / "m.ts"))(x), y, atol=1e-5)


def test_inspect_and_an_anchor_in_a_constant_fed_module(spec):
    loaded, anatomy = inspect_model(spec, input_size=SIZE)
    assert [b.name for b in anatomy.blocks]  # the residual block is found
    gm, report = attnsurgeon.insert(spec, attn="eca", after="table_mlp.0", input_size=SIZE)
    with torch.no_grad():
        assert gm.eval()(torch.randn(1, *SIZE)).shape == (1, 4)


# The models of issue 31, at their own input sizes: each builds positional tables from shapes at
# trace time (relative positions, log-spaced continuous positions, rotary embeddings).
MODELS = {
    "swin_tiny_patch4_window7_224": "layers.1.blocks.0.attn.proj",
    "swinv2_tiny_window8_256": "layers.2.blocks.4.attn.cpb_mlp.2",
    "swinv2_cr_tiny_224": "stages.1.blocks.0.attn.proj",
    "beit_base_patch16_224": "blocks.3.attn.proj",
    "beitv2_base_patch16_224": "blocks.3.attn.proj",
    "eva02_tiny_patch14_224": "blocks.3.attn.proj",
    "vit_small_patch16_dinov3": "blocks.3.attn.proj",
    "vit_base_patch16_rope_reg1_gap_256": "blocks.3.attn.proj",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_models_with_trace_time_tables_take_se_exactly_and_an_anchor_in_attention(name):
    from attnsurgeon.loading.models import build_model

    loaded = build_model(f"timm:{name}")
    base = loaded.model.eval()
    _, anatomy = inspect_model(loaded)
    assert len(anatomy.blocks) >= 12
    gm, report = attnsurgeon.insert(loaded, attn="se", init="identity")
    assert len(report.insertions) >= 24
    x = torch.randn(1, *report.input_size)
    with torch.no_grad():
        want = base(x)
        assert torch.equal(gm.eval()(x), want)
    gm, report = attnsurgeon.insert(loaded, attn="se", init="identity", after=MODELS[name])
    assert len(report.insertions) == 1
    with torch.no_grad():
        assert torch.equal(gm.eval()(x), want)
