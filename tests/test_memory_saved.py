"""What a selective segment keeps for backward beyond the whole-segment checkpoint (issue 20).

The selective recompute (attnsurgeon.rewriting.recompute) rebuilds every feature map of a segment
in backward, and keeps what the backward pass needs that is not a map: the batch norm's batch
statistics and the gate's own small tensors. The checkpoint keeps neither (it re-runs the whole
segment). The difference is therefore a known number of bytes per block, computed here from the
block's shapes and the design (docs/memory-efficient.md, "Peak memory against the checkpoint"):

* SE:   ``2·C`` (the norm's mean and invstd) + ``N·(C + Cr + C)`` (pooled, hidden, gate);
* CBAM: ``2·C + 2`` (the norm's and the spatial gate's norm's statistics)
  + ``N·(C + C + 2·Cr + C)`` (mean- and max-pooled, the shared MLP's hidden twice, the gate)
  + ``N·H·W·5`` (the channel max map, the [mean, max] pair, the conv output, the spatial gate);

float32 numbers, ``C`` the block's channels, ``Cr`` its reduced channels, ``N`` images of ``H×W``.

What is kept is counted independently of any saved-tensor hook (those nest: the innermost one
hides what the others would see, and both the plan and the checkpoint install one): every storage
an op creates during one training forward, weakly referenced, and still alive when it returns.
"""

import copy
import re

import pytest
import timm
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from attnsurgeon import insert
from attnsurgeon.rewriting.memory import Recompute

SIZE = 64
FLOAT = 4  # bytes


class _Created(TorchDispatchMode):
    """Every storage an op creates, by address: a weak reference and its size."""

    def __init__(self):
        super().__init__()
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                self.storages[s.data_ptr()] = (StorageWeakRef(s), s.nbytes())
        return out


def kept_bytes(model, x) -> int:
    """Bytes of the storages one training forward creates that are alive when it returns (what
    the backward pass will read, and the output)."""
    model.train()
    created = _Created()
    with created:
        out = model(x)
    kept = sum(nbytes for ref, nbytes in created.storages.values() if not ref.expired())
    del out
    return kept


def _gate(m):
    """(C, Cr) of an SE module or of CBAM's channel gate."""
    fc1 = getattr(m, "channel", m).fc1
    return fc1.in_channels, fc1.out_channels


EXTRA = {  # (C, Cr, N, H·W) -> numbers kept beyond the checkpoint, per block
    "se": lambda c, cr, n, hw: 2 * c + n * (c + cr + c),
    "cbam": lambda c, cr, n, hw: 2 * c + 2 + n * (3 * c + 2 * cr) + n * hw * 5,
}


def _build(attn):
    torch.manual_seed(0)
    selective, report = insert(timm.create_model("resnet26"), input_size=SIZE, attn=attn, memory_efficient=True)
    checkpointed = copy.deepcopy(selective)
    for m in checkpointed.modules():
        if isinstance(m, Recompute):
            m.plan.unmatched = "forced"  # the same segments, run under torch.utils.checkpoint
    assert {m.method for m in selective.modules() if isinstance(m, Recompute)} == {"selective"}
    assert {m.method for m in checkpointed.modules() if isinstance(m, Recompute)} == {"checkpoint"}
    return selective, checkpointed, report


@pytest.fixture(scope="module")
def models():
    """attn -> (selective, checkpointed, report): resnet26 rewritten once per attn in this module (about a second
    each), every test given its own deep copy (the counts depend on shapes only, but no test sees another's model)."""
    built = {}

    def get(attn):
        if attn not in built:
            built[attn] = _build(attn)
        return copy.deepcopy(built[attn])

    return get


def _map_sizes(model, modules, x) -> dict[str, tuple[int, int]]:
    """(N, H·W) of the map each attention module gates."""
    sizes, handles = {}, []
    for name in modules:
        handles.append(
            model.get_submodule(name).register_forward_pre_hook(
                lambda m, a, name=name: sizes.__setitem__(name, (a[0].shape[0], a[0][0, 0].numel()))
            )
        )
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    return sizes


@pytest.mark.parametrize("batch", [2, 3])
@pytest.mark.parametrize("attn", ["se", "cbam"])
def test_selective_keeps_exactly_the_statistics_and_the_gate_tensors_beyond_the_checkpoint(models, attn, batch):
    selective, checkpointed, report = models(attn)
    x = torch.randn(batch, 3, SIZE, SIZE)
    modules = [s.module for s in report.memory_efficient]
    assert len(modules) == 8
    sizes = _map_sizes(selective, modules, x)
    extra = {name: FLOAT * EXTRA[attn](*_gate(selective.get_submodule(name)), *sizes[name]) for name in modules}
    assert kept_bytes(selective, x) - kept_bytes(checkpointed, x) == sum(extra.values())
    if attn == "se":  # a few numbers a channel: each block's extra is less than its own gated map (C·H·W an image)
        for name, (n, hw) in sizes.items():
            assert extra[name] < FLOAT * n * hw * _gate(selective.get_submodule(name))[0], name


def test_the_count_sees_inside_a_segment(models):
    """The plain insertion keeps the gated map (the last norm's output) of every block; the
    checkpoint of the same segments does not: the count tells them apart by at least that."""
    torch.manual_seed(0)
    plain_model, _ = insert(timm.create_model("resnet26"), input_size=SIZE, attn="se")
    _, checkpointed, report = models("se")
    plain_model.load_state_dict(checkpointed.state_dict())
    x = torch.randn(2, 3, SIZE, SIZE)
    sizes = _map_sizes(plain_model, [s.module for s in report.memory_efficient], x)
    maps = FLOAT * sum(n * hw * _gate(plain_model.get_submodule(name))[0] for name, (n, hw) in sizes.items())
    assert kept_bytes(plain_model, x) - kept_bytes(checkpointed, x) >= maps


def _cells(line):
    """A Rich table row's cells (the header is drawn with heavy bars)."""
    return [c.strip() for c in re.split("[│┃]", line)[1:-1]]


def test_the_table_and_the_summary_say_each_segments_method(capsys):
    from types import SimpleNamespace

    from attnsurgeon.cli.render import print_memory_efficient
    from attnsurgeon.rewriting.memory import Segment

    segments = [
        Segment("layer1.0.se", "layer1.0.se_recompute", "layer1.0.bn3", 7, "selective"),
        Segment("layer1.1.drop_se", "layer1.1.drop_se_recompute", "layer1.1.bn3", 8, "checkpoint"),
        Segment("layer2.0.se", "layer2.0.se_recompute", None, 6, "selective"),
    ]
    print_memory_efficient(SimpleNamespace(model="m", source="timm", memory_efficient=segments), table=True)
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if "attention module" in line)
    assert _cells(header)[-1] == "method"
    for s in segments:
        (row,) = [line for line in lines if s.module + " " in line]
        assert _cells(row)[-1] == s.method
    assert (
        "3 attention modules recomputed in the backward pass (2 with the norm/activation before them; "
        "2 selective, 1 checkpoint)" in lines[-1]
    )


def test_cli_optimize_lists_the_method(cli):
    code, out, _ = cli("optimize", "timm:seresnet18", "--input-size", SIZE)
    assert code == 0
    rows = [line for line in out.splitlines() if ".se " in line]
    assert len(rows) == 8 and all(_cells(row)[-1] == "selective" for row in rows)
