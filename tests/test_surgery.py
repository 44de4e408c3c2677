"""Surgery: where each position lands, parity with timm's hand-written models, identity init,
key preservation, stacking, layouts, and the models the tool must handle."""

import copy
import math
import operator

import pytest
import timm
import torch
from torch import nn

import attnsurgeon
from attnsurgeon import AttnSurgeonError, InsertionSpec, apply_plan, insert

SMALL = (3, 64, 64)


def _call(gm, target):
    nodes = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == target]
    assert len(nodes) == 1, target
    return nodes[0]


def _src(node):
    """The node feeding an inserted module, seen through layout adapters."""
    x = node.args[0]
    while x.op == "call_method" and x.target in ("permute", "transpose", "unsqueeze"):
        x = x.args[0]
    return x


def _is_merge(node):
    return node.op == "call_function" and node.target in (operator.add, operator.iadd)


def _users(node):
    return {u.target if u.op == "call_module" else u.name for u in node.users}


# --------------------------------------------------------------------------- placement


@pytest.mark.slow
def test_positions_on_a_bottleneck_with_projection():
    cases = {
        "standard": ("layer2.0.se", "layer2.0.bn3"),
        "pre": ("layer2.0.se_pre", "layer1.2.relu"),
        "post": ("layer2.0.se_post", "layer2.0.relu"),
        "identity": ("layer2.0.se_identity", "layer2.0.downsample.1"),
        "3x3": ("layer2.0.se_3x3", "layer2.0.relu"),
    }
    for position, (module, source) in cases.items():
        gm, report = insert("resnet50", "se", position, blocks=["layer2.0"], input_size=SMALL)
        node = _call(gm, module)
        assert _src(node).target == source, position
        assert report.insertions[0].module == module
        users = list(node.users)
        if position == "standard":
            (add,) = users  # feeds the merge, whose other input is the projection
            assert {a.target for a in add.args if a is not node} == {"layer2.0.downsample.1"}
        elif position == "pre":
            assert _users(node) == {"layer2.0.conv1"}
            ds = _call(gm, "layer2.0.downsample.0")
            assert ds.args[0].target == "layer1.2.relu"  # the skip still sees the raw input
        elif position == "post":
            assert _is_merge(_src(node).args[0])  # the relu closing the merge
            assert "layer2.1.conv1" in _users(node)
        elif position == "identity":
            (add,) = users
            assert any(a.target == "layer2.0.bn3" for a in add.args if a is not node)
        else:
            assert _src(node).args[0].target == "layer2.0.bn2" and _users(node) == {"layer2.0.conv3"}


def test_positions_on_a_basic_block_with_identity_skip(resnet18):
    gm, _ = apply_plan(
        resnet18(),
        [InsertionSpec("se", "pre", blocks=["layer1.0"]), InsertionSpec("eca", "identity", blocks=["layer1.0"])],
        input_size=SMALL,
    )
    pre, ident = _call(gm, "layer1.0.se_pre"), _call(gm, "layer1.0.eca_identity")
    assert _src(pre).target == "maxpool" and _src(ident).target == "maxpool"
    assert _users(pre) == {"layer1.0.conv1"}
    (add,) = ident.users
    assert add.args[1] is ident or add.args[0] is ident
    gm, _ = insert(resnet18(), "se", "3x3", blocks=["layer1.0"], input_size=SMALL)
    node = _call(gm, "layer1.0.se_3x3")  # after the first 3x3 conv, its BN and ReLU
    assert _src(node).args[0].target == "layer1.0.bn1" and _users(node) == {"layer1.0.conv2"}


@pytest.mark.slow
def test_positions_on_an_inverted_residual():
    gm, _ = insert("mobilenet_v2", "se", "3x3", blocks=["features.3"], input_size=SMALL)
    node = _call(gm, "features.3.se_3x3")
    assert _src(node).target == "features.3.conv.1.2" and _users(node) == {"features.3.conv.2"}
    gm, _ = insert("mobilenet_v2", "eca", "standard", blocks=["features.3"], input_size=SMALL)
    node = _call(gm, "features.3.eca")
    assert _src(node).target == "features.3.conv.3" and len(node.users) == 1 and _is_merge(next(iter(node.users)))
    with pytest.raises(
        AttnSurgeonError, match=r"position 'identity' is not available in block features.2 \(plain: it has no skip"
    ):
        insert("mobilenet_v2", "se", "identity", blocks=["features.2"], input_size=SMALL)


def test_stacking_post_then_pre_nests_and_same_site_keeps_order(resnet18):
    gm, _ = apply_plan(
        resnet18(),
        [InsertionSpec("se", "post", blocks=["layer1.0"]), InsertionSpec("eca", "pre", blocks=["layer1.1"])],
        input_size=SMALL,
    )
    post, pre = _call(gm, "layer1.0.se_post"), _call(gm, "layer1.1.eca_pre")
    assert _src(pre) is post  # out -> post -> pre -> branch
    merge = next(n for n in post.users if n is not pre)
    assert _is_merge(merge)  # the skip of layer1.1 sees post, not pre
    gm, _ = apply_plan(
        resnet18(),
        [InsertionSpec("eca", "pre", blocks=["layer1.1"]), InsertionSpec("se", "post", blocks=["layer1.0"])],
        input_size=SMALL,
    )
    assert _src(_call(gm, "layer1.1.eca_pre")) is _call(gm, "layer1.0.se_post")  # same graph either order
    gm, _ = apply_plan(
        resnet18(),
        [InsertionSpec("se", blocks=["layer1.0"]), InsertionSpec("eca", blocks=["layer1.0"])],
        input_size=SMALL,
    )
    assert _src(_call(gm, "layer1.0.eca")) is _call(gm, "layer1.0.se")


# --------------------------------------------------------------------------- parity with timm


@pytest.mark.slow
@pytest.mark.parametrize("depth", [18, 34, 50])
def test_params_equal_timm_seresnet(depth):
    _, report = insert(f"timm:resnet{depth}", "se", input_size=SMALL)
    ref = timm.create_model(f"seresnet{depth}")
    assert report.params["modified"] == sum(p.numel() for p in ref.parameters())
    assert report.params["base"] == sum(p.numel() for p in timm.create_model(f"resnet{depth}").parameters())


@pytest.mark.slow
def test_outputs_equal_timm_seresnet50_given_the_same_weights(x_small):
    model, _ = insert("timm:resnet50", "se", input_size=SMALL)
    torch.manual_seed(0)
    ref = timm.create_model("seresnet50").eval()
    with torch.no_grad():  # non-trivial BN statistics so every layer matters
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    assert set(model.state_dict()) == set(ref.state_dict())
    model.load_state_dict(ref.state_dict())
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x_small), ref(x_small), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- init and keys


@pytest.mark.slow
@pytest.mark.parametrize("attn", ["se", "eca", "cbam"])
def test_identity_init_is_exact_at_every_position_and_still_learns(attn, x_small):
    torch.manual_seed(0)
    base = timm.create_model("resnet50").eval()
    with torch.no_grad():
        for m in base.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.weight.uniform_(0.5, 1.5)
        expected = base(x_small)
    for position in ("standard", "pre", "post", "identity", "3x3"):
        # the rewritten model shares the base's modules: train-mode steps would move its BN statistics
        model, report = insert(copy.deepcopy(base), attn, position, init="identity", input_size=SMALL)
        model.eval()
        with torch.no_grad():
            assert (model(x_small) - expected).abs().max().item() <= 1e-5, position
        model.train()
        model(x_small).square().mean().backward()
        for ins in report.insertions:
            grads = [p.grad for p in model.get_submodule(ins.module).parameters()]
            assert all(g is not None for g in grads)
            assert sum(g.abs().sum().item() for g in grads) > 0, (position, ins.module)


def test_identity_se_with_bias_gives_every_parameter_a_gradient(x_small):
    model, report = insert("resnet18", "se", init="identity", blocks=["layer3.0"], input_size=SMALL)
    model.train()
    model(x_small).sum().backward()
    se = model.get_submodule(report.insertions[0].module)
    for name, p in se.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_base_keys_and_values_are_preserved():
    torch.manual_seed(0)
    base = attnsurgeon.load_model("efficientnet_b0").model
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model, report = insert(base, "cbam", "3x3", init="identity", input_size=SMALL)
    after = model.state_dict()
    for key, value in before.items():
        assert key in after and torch.equal(after[key], value), key
    assert torch.equal(base.state_dict()["features.0.0.weight"], before["features.0.0.weight"])
    added = set(after) - set(before)
    assert added and all(any(k.startswith(i.module + ".") for i in report.insertions) for k in added)


def test_unused_parameters_keep_their_names():
    class WithSpareHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = attnsurgeon.load_model("resnet18").model
            self.spare = nn.Linear(4, 4)  # never called in forward

        def forward(self, x):
            return self.body(x)

    model, _ = insert(WithSpareHead(), "se", input_size=SMALL)
    assert {"spare.weight", "spare.bias"} <= set(model.state_dict())


@pytest.mark.slow
def test_training_mode_stays_live_for_dropout_and_drop_path(x_small):
    """Stochastic modules are kept whole, so model.train() still turns them on after surgery."""
    model, _ = insert(timm.create_model("convnext_tiny", drop_path_rate=0.5), "eca", stages=[4], input_size=SMALL)
    model.train()
    torch.manual_seed(0)
    a = model(x_small)
    b = model(x_small)
    assert not torch.allclose(a, b)  # drop path is random in train mode
    model.eval()
    assert torch.allclose(model(x_small), model(x_small))


# --------------------------------------------------------------------------- options


@pytest.mark.slow
def test_eca_adaptive_kernel_and_per_stage_kernels():
    def adaptive(c, gamma=2, b=1):
        t = int(abs(math.log2(c) + b) / gamma)
        return max(t if t % 2 else t + 1, 3)

    _, report = insert("resnet50", "eca", input_size=SMALL)
    for ins in report.insertions:
        assert ins.options["kernel_size"] == adaptive(ins.channels)
        assert ins.params == adaptive(ins.channels)
    _, report = insert("resnet50", "eca", kernel_size=[3, 5, 5, 7], input_size=SMALL)
    assert {ins.stage: ins.options["kernel_size"] for ins in report.insertions} == {1: 3, 2: 5, 3: 5, 4: 7}
    _, report = insert("resnet50", "eca", stages=[3, 4], kernel_size=[5, 9], input_size=SMALL)
    assert {ins.stage: ins.options["kernel_size"] for ins in report.insertions} == {3: 5, 4: 9}


@pytest.mark.slow
def test_reduction_and_bias_change_the_parameter_count():
    for r in (2, 4, 8, 16, 32):
        _, report = insert("resnet50", "se", reduction=r, bias=False, rd_divisor=1, stages=[4], input_size=SMALL)
        assert report.params["delta"] == 3 * 2 * 2048 * (2048 // r)  # two bias-free FC layers per block


def test_bad_options_are_clear_errors(resnet18):
    with pytest.raises(AttnSurgeonError, match="reduction must be a number > 0"):
        insert(resnet18(), "se", reduction=0, input_size=SMALL)
    with pytest.raises(AttnSurgeonError, match="takes no option 'reduction'"):
        insert(resnet18(), "eca", reduction=4, input_size=SMALL)
    with pytest.raises(AttnSurgeonError, match="positive odd"):
        insert(resnet18(), "eca", kernel_size=4, input_size=SMALL)
    with pytest.raises(AttnSurgeonError, match=r"2 values given \(3, 5\) for 4 selected stages"):
        insert(resnet18(), "eca", kernel_size=[3, 5], input_size=SMALL)
    with pytest.raises(AttnSurgeonError, match=r"stage 5 out of range: the model has 4 stages \(1-4\)"):
        insert(resnet18(), "se", stages=[5], input_size=SMALL)
    with pytest.raises(AttnSurgeonError, match="block pattern 'layer9.*' matches no block"):
        insert(resnet18(), "se", blocks=["layer9.*"], input_size=SMALL)
    with pytest.raises(AttnSurgeonError, match=r"unknown attention block 'sse'.*Did you mean: .*\bse\b"):
        insert(resnet18(), "sse", input_size=SMALL)
    with pytest.raises(AttnSurgeonError, match="unknown position 'middle'"):
        insert(resnet18(), "se", "middle", input_size=SMALL)
    with pytest.raises(AttnSurgeonError, match="unknown init"):
        insert(resnet18(), "se", init="zeros", input_size=SMALL)


# --------------------------------------------------------------------------- layouts


class _TokenMixer(nn.Module):
    """(B, N, C) residual blocks, channels last: an MLP-Mixer-like toy. On a 3×40×56 image: 5×7 = 35 tokens of 24
    channels."""

    def __init__(self, dim=24, depth=2):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 8, stride=8)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim)) for _ in range(depth)
        )
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        for blk in self.blocks:
            x = x + blk(x)
        return self.head(x.mean(1))

    def by_hand(self, x, unit, gates):
        """forward, written out, with gate k applied in NCL (transposed by hand) where ``unit`` puts it in block k."""
        x = self.embed(x).flatten(2).transpose(1, 2)
        for blk, gate in zip(self.blocks, gates, strict=True):  # one gate per block
            x = unit(x, blk, lambda t, gate=gate: gate(t.transpose(1, 2)).transpose(1, 2))
        return self.head(x.mean(1))


class _ChannelsLastNet(nn.Module):
    """NHWC residual blocks (ConvNeXt-style MLPs applied after a permute). On a 3×20×28 image: H = 5, W = 7, C = 24."""

    def __init__(self, dim=24):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, stride=4)
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
            for _ in range(2)
        )

    def forward(self, x):
        x = self.stem(x).permute(0, 2, 3, 1)
        for mlp in self.mlps:
            x = x + mlp(x)
        return x.mean((1, 2))

    def by_hand(self, x, unit, gates):
        """forward, written out, with gate k applied in NCHW (permuted by hand) where ``unit`` puts it in block k."""
        x = self.stem(x).permute(0, 2, 3, 1)
        for mlp, gate in zip(self.mlps, gates, strict=True):  # one gate per block
            x = unit(x, mlp, lambda t, gate=gate: gate(t.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
        return x.mean((1, 2))


# one residual unit x + f(x), with the gate g where each position puts it (the positions' definitions, by hand)
_UNIT_WITH_GATE = {
    "standard": lambda x, f, g: x + g(f(x)),
    "pre": lambda x, f, g: x + f(g(x)),
    "post": lambda x, f, g: g(x + f(x)),
    "identity": lambda x, f, g: g(x) + f(x),
}


@pytest.mark.slow
@pytest.mark.parametrize(
    "net, size, layout", [(_TokenMixer, (3, 40, 56), "NLC"), (_ChannelsLastNet, (3, 20, 28), "NHWC")]
)
@pytest.mark.parametrize("attn", ["se", "eca", "cbam"])
def test_channels_last_layouts_with_real_weights(net, size, layout, attn):
    """Blocks on channels-last maps, with their default (random) weights, give what the same modules give applied by
    hand in channels-first order at each position. No two of H, W, C (or N, C) are equal, so a permutation that goes
    the wrong way cannot keep the values; ECA, whose weights fit any channel count, is the one a shape check misses."""
    torch.manual_seed(0)
    base = net().eval()
    x = torch.randn(2, *size)
    with torch.no_grad():
        expected = base(x)
    options = {} if attn == "eca" else {"reduction": 4}
    for position, unit in _UNIT_WITH_GATE.items():
        model, report = insert(base, attn, position, input_size=size, **options)
        assert [(i.layout, i.channels) for i in report.insertions] == [(layout, 24)] * 2, position
        gates = [model.get_submodule(i.module) for i in report.insertions]  # in forward order: block add, then add_1
        model.eval()
        with torch.no_grad():
            got = model(x)
            torch.testing.assert_close(got, base.by_hand(x, unit, gates), rtol=0, atol=1e-5, msg=position)
            assert (got - expected).abs().max() > 1e-3, position  # the gates change the outputs: the check has teeth
        model, _ = insert(base, attn, position, init="identity", input_size=size, **options)
        with torch.no_grad():
            assert torch.allclose(model.eval()(x), expected, rtol=0, atol=1e-6), position


class _Conv1dNet(nn.Module):
    """(B, C, L) residual conv blocks: the 1-D layout, channels first. On a 1×300 signal: L = 30, C = 24."""

    def __init__(self, dim=24):
        super().__init__()
        self.stem = nn.Conv1d(1, dim, 10, stride=10)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv1d(dim, dim, 3, padding=1), nn.BatchNorm1d(dim), nn.ReLU()) for _ in range(2)
        )

    def forward(self, x):
        x = self.stem(x)
        for blk in self.blocks:
            x = x + blk(x)
        return x.mean(2)

    def by_hand(self, x, unit, gates):
        x = self.stem(x)
        for blk, gate in zip(self.blocks, gates, strict=True):  # one gate per block
            x = unit(x, blk, gate)
        return x.mean(2)


@pytest.mark.parametrize(
    "net, size, layout",
    [(_ChannelsLastNet, (3, 20, 28), "NHWC"), (_TokenMixer, (3, 40, 56), "NLC"), (_Conv1dNet, (1, 300), "NCL")],
)
def test_each_layout_with_real_weights_fast(net, size, layout):
    """The fast subset's check of each layout (the slow test above runs every block and position): ECA, whose
    weights fit any channel count, at the standard position, against the same gates applied by hand in
    channels-first order. A permutation around the block that goes the wrong way fails it."""
    torch.manual_seed(0)
    base = net().eval()
    x = torch.randn(2, *size)
    model, report = insert(base, "eca", "standard", input_size=size)
    assert [(i.layout, i.channels) for i in report.insertions] == [(layout, 24)] * 2
    gates = [model.get_submodule(i.module) for i in report.insertions]
    with torch.no_grad():
        got, expected = model.eval()(x), base(x)
        torch.testing.assert_close(got, base.by_hand(x, _UNIT_WITH_GATE["standard"], gates), rtol=0, atol=1e-5)
        assert (got - expected).abs().max() > 1e-3  # the gates change the outputs: the check has teeth


# --------------------------------------------------------------------------- coverage of the models the issue names

MUST_WORK = [
    "tv:resnet18",
    "tv:resnet50",
    "tv:resnext50_32x4d",
    "tv:wide_resnet50_2",
    "tv:mobilenet_v2",
    "tv:mobilenet_v3_large",
    "tv:efficientnet_b0",
    "tv:regnet_y_400mf",
    "tv:convnext_tiny",
    "tv:densenet121",
    "tv:vgg11",
    "timm:resnet50",
    "timm:resnet50d",
    "timm:efficientnet_b0",
    "timm:convnext_tiny",
]


@pytest.mark.slow
@pytest.mark.parametrize("name", MUST_WORK)
def test_must_work_models(name, x_small):
    """SE in every block, identity-initialised: the base model's outputs exactly, and every inserted SE on the path to
    them (a module registered but not wired in would give the same outputs)."""
    from wiring import assert_each_is_read

    torch.manual_seed(0)
    loaded = attnsurgeon.load_model(name)
    base = loaded.model.eval()
    with torch.no_grad():
        expected = base(x_small)
    model, report = insert(loaded, "se", init="identity", input_size=SMALL)
    _, anatomy = attnsurgeon.inspect_model(model, input_size=SMALL)  # re-tracing keeps inserted blocks whole
    assert len(report.insertions) == len(anatomy.blocks) > 0
    assert report.params["delta"] == sum(i.params for i in report.insertions) > 0
    got = assert_each_is_read(model.eval(), [i.module for i in report.insertions], lambda: model(x_small))
    assert got.shape == (2, 1000) and torch.equal(got, expected)
