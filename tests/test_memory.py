"""--memory-efficient and `optimize`: gates recomputed in the backward pass (attnsurgeon.rewriting.memory,
attnsurgeon.rewriting.recompute).

The reference is always the same model without the rewrite: its outputs, its gradients, its batch
norm statistics after one training step, its state_dict and its exported graph; memory is compared
by the bytes autograd saves for backward (deterministic), against the model with no attention; what
backward recomputes is read from the aten ops it runs, against the whole-segment checkpoint."""

import copy
import json

import pytest
import timm
import torch
from timm.models.resnet import Bottleneck, ResNet
from torch import nn

from attnsurgeon import AttnSurgeonError, insert, optimize
from attnsurgeon.graph.tracing import trace
from attnsurgeon.rewriting.memory import Recompute, plain, recompute_modules

SIZE = 64


class _Block(nn.Module):
    """A residual block whose gate site comes after a dropout and a norm: the recomputed part
    holds random ops and batch norm statistics."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1, self.act1 = (
            nn.Conv2d(c, c, 3, padding=1, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(inplace=True),
        )
        self.conv2, self.bn2, self.drop = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.Dropout(0.3)
        self.act2 = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act2(self.drop(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))) + x)


class _Tiny(nn.Module):
    def __init__(self, c=16, momentum=0.1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.layers = nn.Sequential(_Block(c), _Block(c))
        self.head = nn.Linear(c, 10)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = momentum

    def forward(self, x):
        return self.head(self.layers(self.stem(x)).mean((2, 3)))


def _bottlenecks(**kwargs):
    """resnet26's layout (timm's ResNet, two bottlenecks per stage: eight gate sites) at an eighth of its widths: the
    same segments to recompute, at a fraction of the compute."""
    return ResNet(Bottleneck, (2, 2, 2, 2), channels=(8, 16, 32, 64), stem_width=16, num_classes=10, **kwargs)


def _step(model, x, seed=1, dtype=None):
    """One training step's output, gradients (by parameter name) and buffers afterwards."""
    model.train()
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = model(x)
    out.float().pow(2).mean().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads, {n: b.detach().clone() for n, b in model.named_buffers()}


def _assert_same_step(plain_model, efficient, x, dtype=None):
    """The same output and statistics, bit for bit; gradients as close to exact as the plain model's.

    A gate's gradient is a sum the memory-efficient model takes in another order (from the norm's input,
    attnsurgeon.rewriting.gate_product), so in float32 the two differ by rounding. Against a float64 step of the
    same model, the efficient model's largest relative error over its parameters must be within twice the plain
    model's, and each parameter's within float32 noise (1e-5) or twice the plain one's (test_gate_product)."""
    out_a, grads_a, bufs_a = _step(plain_model, x, dtype=dtype)
    out_b, grads_b, bufs_b = _step(efficient, x, dtype=dtype)
    assert torch.equal(out_a, out_b)
    assert grads_a.keys() == grads_b.keys() and grads_a
    if dtype is None:
        exact = _step(copy.deepcopy(plain_model).double(), x.double())[1]
        off = {
            name: [
                float((t.double() - g).abs().max() / g.abs().max().clamp_min(1e-30))
                for t in (grads_a[name], grads_b[name])
            ]
            for name, g in exact.items()
        }
        assert max(b for _, b in off.values()) <= 2 * max(a for a, _ in off.values())
        for name, (a, b) in off.items():
            assert b <= max(2 * a, 1e-5), name
    else:  # under autocast nothing is summed in another order
        for name, g in grads_a.items():
            assert (g - grads_b[name]).abs().max() <= 1e-6 * g.abs().max().clamp_min(1e-12), name
    assert bufs_a.keys() == bufs_b.keys()
    for name, b in bufs_a.items():  # running_mean/var and num_batches_tracked: updated once, as in the plain model
        assert torch.equal(b, bufs_b[name]), name


def _pair(base, **kwargs):
    """The plain insertion and the memory-efficient one, on two copies of ``base`` with its weights."""
    plain_model, _ = insert(copy.deepcopy(base), input_size=SIZE, **kwargs)
    efficient, report = insert(copy.deepcopy(base), input_size=SIZE, memory_efficient=True, **kwargs)
    efficient.load_state_dict(plain_model.state_dict())
    return plain_model, efficient, report


def _methods(model):
    return [m.method for m in model.modules() if isinstance(m, Recompute)]


def _saved_bytes(model, x):
    """Bytes autograd keeps for the backward pass of one training forward (each storage once)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(storages.values())


@pytest.mark.parametrize("momentum", [0.1, None])  # None: cumulative average, which reads num_batches_tracked
def test_dropout_and_batch_norm_in_the_recomputed_part(momentum):
    torch.manual_seed(0)
    base = _Tiny(momentum=momentum)
    plain_model, efficient, report = _pair(base, attn="se", reduction=4)
    # the gate, the dropout and the norm before it are recomputed: the random mask must repeat
    # the dropout's mask is as large as the map: no selective plan, the whole segment is checkpointed
    assert [(s.module, s.start, s.ops, s.method) for s in report.memory_efficient] == [
        ("layers.0.se", "layers.0.bn2", 3, "checkpoint"),
        ("layers.1.se", "layers.1.bn2", 3, "checkpoint"),
    ]
    x = torch.randn(4, 3, SIZE, SIZE)
    _assert_same_step(plain_model, efficient, x)
    _assert_same_step(plain_model, efficient, x)  # a second step: the statistics keep agreeing


@pytest.mark.slow
@pytest.mark.parametrize("attn", ["se", "eca", "cbam"])
@pytest.mark.parametrize("position", ["standard", "pre", "post", "identity", "3x3"])
def test_gradients_and_statistics_equal_the_plain_insertion(attn, position):
    torch.manual_seed(0)
    base = _bottlenecks(drop_path_rate=0.2)  # with drop path
    plain_model, efficient, report = _pair(base, attn=attn, position=position)
    assert len(report.memory_efficient) == len(report.insertions) == 8
    assert {s.method for s in report.memory_efficient} == {"selective"}
    _assert_same_step(plain_model, efficient, torch.randn(2, 3, SIZE, SIZE))
    assert set(_methods(efficient)) == {"selective"}  # every large tensor the step kept was rebuilt


@pytest.mark.slow
def test_autocast_and_channels_last():
    torch.manual_seed(0)
    plain_model, efficient, _ = _pair(_bottlenecks(drop_path_rate=0.1), attn="cbam")
    plain_model, efficient = (m.to(memory_format=torch.channels_last) for m in (plain_model, efficient))
    x = torch.randn(2, 3, SIZE, SIZE).to(memory_format=torch.channels_last)
    _assert_same_step(plain_model, efficient, x, dtype=torch.bfloat16)


@pytest.mark.slow
@pytest.mark.parametrize("attn", ["se", "eca", "cbam"])
def test_the_gated_map_is_not_kept_for_backward(attn):
    """A gate keeps its input (the bottleneck's last norm output) for backward; rebuilt, the step
    keeps no more than the model without any attention (the gate vectors are smaller than the
    feature maps the plain graph frees earlier), and no more than the whole-segment checkpoint."""
    torch.manual_seed(0)
    base = _bottlenecks()
    x = torch.randn(2, 3, SIZE, SIZE)
    without = _saved_bytes(trace(copy.deepcopy(base)), x)
    plain_model, efficient, _ = _pair(base, attn=attn)
    assert _saved_bytes(plain_model, x) > 1.02 * without
    assert _saved_bytes(efficient, x) <= 1.005 * without
    checkpointed = copy.deepcopy(efficient)
    for m in checkpointed.modules():
        if isinstance(m, Recompute):
            m.plan.unmatched = "forced"
    assert set(_methods(checkpointed)) == {"checkpoint"}
    assert _saved_bytes(efficient, x) <= _saved_bytes(checkpointed, x)


def _backward_ops(model, x):
    """aten ops (name -> count) one training step's backward pass runs."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    ops = Counter()
    model.train()
    loss = model(x).pow(2).mean()
    with Log():
        loss.backward()
    return ops


@pytest.mark.slow
@pytest.mark.parametrize("attn, rebuilt", [("se", 0), ("eca", 0), ("cbam", 8)])
def test_backward_rebuilds_the_norm_output_only(attn, rebuilt):
    """Backward runs no batch norm forward, no pooling and no gate again. SE's and ECA's gates take their gradient
    from the norm's input (gate_product): nothing is rebuilt. CBAM's max pooling reads the norm's output:
    one fused pass per gate rebuilds it (and one product, the map its spatial gate reads). The
    whole-segment checkpoint runs the batch norm again for each."""
    torch.manual_seed(0)
    _, efficient, _ = _pair(_bottlenecks(), attn=attn)
    checkpointed = copy.deepcopy(efficient)
    for m in checkpointed.modules():
        if isinstance(m, Recompute):
            m.plan.unmatched = "forced"
    x = torch.randn(2, 3, SIZE, SIZE)
    selective, full = _backward_ops(efficient, x), _backward_ops(checkpointed, x)
    norm_forward = ("native_batch_norm", "_batch_norm_with_update")
    assert sum(full[k] for k in norm_forward) >= 8  # the reference recomputes every gate's norm
    assert sum(selective[k] for k in norm_forward) == 0 and selective["addcmul"] == rebuilt
    assert selective["mean"] == 0 and selective["sigmoid"] == 0 and selective["convolution"] == 0


class _ExpGate(nn.Module):
    """A gate that keeps a map no plan rebuilds: exp keeps its own output."""

    def forward(self, x):
        return x * torch.exp(x).mean((2, 3), keepdim=True).sigmoid()


class _Segmented(nn.Sequential):
    """conv, norm, gate; the norm and the gate run by a Recompute, as the rewrite leaves them."""

    def forward(self, x):
        return self.recompute(self[0](x))


def test_a_map_the_plan_cannot_rebuild_hands_the_segment_to_checkpoint():
    torch.manual_seed(0)
    plain_model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), _ExpGate())
    graph = torch.fx.Graph()
    graph.output(graph.call_module("2", (graph.call_module("1", (graph.placeholder("z"),)),)))
    efficient = _Segmented(*copy.deepcopy(plain_model))
    efficient.recompute = Recompute(torch.fx.GraphModule(efficient, graph), [efficient[1]])
    assert efficient.recompute.method == "selective"
    x = torch.randn(2, 3, 16, 16)
    _assert_same_step(plain_model, efficient, x)  # exact, with exp's output kept
    assert efficient.recompute.method == "checkpoint" and "(2, 8, 16, 16)" in efficient.recompute.plan.unmatched
    _assert_same_step(plain_model, efficient, x)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    ["timm:seresnet18", "timm:efficientnet_b0", "timm:mobilenetv3_small_050", "timm:regnety_002", "mobilenet_v3_small"],
)
def test_optimize_the_attention_a_model_has(name):
    from attnsurgeon import load_model

    base = load_model(name).model
    efficient, report = optimize(copy.deepcopy(base), input_size=SIZE)
    reference = trace(copy.deepcopy(base))
    efficient.load_state_dict(reference.state_dict())
    gates = [m for m in report.memory_efficient]
    assert gates and len(recompute_modules(efficient)) == len(gates)
    assert report.params["delta"] == 0 and not report.insertions
    x = torch.randn(2, 3, SIZE, SIZE)
    _assert_same_step(reference, efficient, x)
    assert set(_methods(efficient)) == {"selective"}
    assert _saved_bytes(efficient, x) < _saved_bytes(reference, x)


@pytest.mark.slow
def test_nothing_changes_in_eval_names_or_state():
    torch.manual_seed(0)
    base = timm.create_model("resnet18")
    plain_model, efficient, _ = _pair(base, attn="eca")
    assert [n for n, _ in efficient.named_parameters()] == [n for n, _ in plain_model.named_parameters()]
    assert list(efficient.state_dict()) == list(plain_model.state_dict())
    assert all(
        not list(m.parameters()) and not list(m.buffers()) for m in efficient.modules() if isinstance(m, Recompute)
    )
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(plain_model.eval()(x), efficient.eval()(x))
    # in eval mode, with gradients on, nothing is recomputed: the gate keeps its input as before
    plain_model.eval(), efficient.eval()
    counts = []
    for m in (plain_model, efficient):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, saved=saved: saved.append(t) or t, lambda t: t):
            m(x)
        counts.append(len(saved))
    assert counts[0] == counts[1]


@pytest.mark.slow
def test_plain_is_the_plain_graph_and_exports_match(tmp_path):
    from attnsurgeon import export

    torch.manual_seed(0)
    plain_model, efficient, _ = _pair(timm.create_model("resnet18"), attn="se")
    inlined = plain(efficient)
    assert not recompute_modules(inlined) and recompute_modules(efficient)  # the model itself is left as it was
    assert [n.target for n in inlined.graph.nodes] == [n.target for n in plain_model.graph.nodes]
    paths = [tmp_path / "plain.pt2", tmp_path / "efficient.pt2"]
    for model, path in zip((plain_model, efficient), paths, strict=True):
        export(model, path, input_size=SIZE)
    programs = [torch.export.load(str(p)) for p in paths]
    ops = [[str(n.target) for n in p.graph.nodes if n.op == "call_function"] for p in programs]
    assert ops[0] == ops[1]
    assert list(programs[0].state_dict) == list(programs[1].state_dict)


@pytest.mark.slow
def test_saved_model_stays_memory_efficient(tmp_path):
    from attnsurgeon import export, load

    efficient, _ = insert("resnet18", attn="se", input_size=SIZE, memory_efficient=True)
    export(efficient, tmp_path / "m.safetensors")
    back = load(tmp_path / "m.safetensors")
    assert recompute_modules(back) == recompute_modules(efficient)
    optimized, _ = optimize("timm:seresnet18", input_size=SIZE)
    export(optimized, tmp_path / "o.safetensors")
    assert len(recompute_modules(load(tmp_path / "o.safetensors"))) == 8


def test_errors():
    with pytest.raises(AttnSurgeonError, match="no attention gate to recompute.*--memory-efficient"):
        optimize("resnet18", input_size=SIZE)
    with pytest.raises(AttnSurgeonError, match="inserts no block to recompute"):
        insert("timm:seresnet18", attn="none", replace=True, input_size=SIZE, memory_efficient=True)


def test_recipe_key():
    from attnsurgeon.planning.recipes import parse_recipe

    recipe = parse_recipe({"model": "resnet18", "memory_efficient": True, "insertions": [{"attn": "se"}]})
    assert recipe.memory_efficient and recipe.to_dict()["memory_efficient"] is True
    assert "memory_efficient" not in parse_recipe({"model": "resnet18", "insertions": [{"attn": "se"}]}).to_dict()
    with pytest.raises(AttnSurgeonError, match="memory_efficient: expected bool"):
        parse_recipe({"model": "resnet18", "memory_efficient": "yes", "insertions": [{"attn": "se"}]})


@pytest.mark.slow
def test_cli_optimize_insert_and_errors(cli):
    code, out, _ = cli("optimize", "timm:seresnet18", "--input-size", SIZE, "--json")
    assert code == 0
    report = json.loads(out)
    assert [s["start"] for s in report["memory_efficient"]][:2] == ["layer1.0.bn2", "layer1.1.bn2"]
    code, out, _ = cli("optimize", "timm:seresnet18", "--input-size", SIZE)
    assert code == 0 and "8 attention modules recomputed in the backward pass" in out
    code, out, _ = cli("insert", "resnet18", "--attn", "se", "--memory-efficient", "--input-size", SIZE, "--json")
    assert code == 0 and len(json.loads(out)["memory_efficient"]) == 8
    code, _, err = cli("optimize", "resnet18", "--input-size", SIZE)
    assert code == 2 and "no attention gate to recompute" in err and "Traceback" not in err


@pytest.mark.slow
def test_cli_profile_before_and_after(cli):
    code, out, _ = cli(
        "profile",
        "timm:efficientnet_b0",
        "--memory-efficient",
        "--mode",
        "train",
        "--input-size",
        SIZE,
        "--batch-size",
        8,
        "--min-time",
        0.05,
        "--max-time",
        0.1,
        "--json",
    )
    assert code == 0
    result = json.loads(out)
    assert result["delta"]["params"] == 0 and result["delta"]["macs"] == 0
    assert result["delta_percent"]["peak_memory_bytes"] < -5  # the SE inputs are no longer kept (-11.8 % measured)


def test_cli_apply_recipe_memory_efficient(cli, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: resnet18\ninput_size: 64\nmemory_efficient: true\ninsertions:\n  - attn: eca\n    stages: [3, 4]\n"
    )
    code, out, _ = cli("apply", recipe, "--json")
    assert code == 0
    assert [s["module"] for s in json.loads(out)["memory_efficient"]] == [
        "layer3.0.eca",
        "layer3.1.eca",
        "layer4.0.eca",
        "layer4.1.eca",
    ]
