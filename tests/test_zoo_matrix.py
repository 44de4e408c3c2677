"""Every block of the zoo at every position its kind allows, on five kinds of network.

resnet50 (bottleneck), resnet18 (basic block), mobilenet_v3_large (inverted residual), convnext_tiny
(channels-last blocks) and vit_b_16 (tokens). One surgery per (model, position) carries every block
that fits there, each on its own block of the model, all with ``init='identity'``: the rewritten
model must then give exactly the base model's outputs (each block is an exact identity at init), the
parameters must grow by exactly the new modules', and every inserted module must be on the path to
the outputs (:func:`wiring.assert_each_is_read`: identical outputs alone cannot tell a wired block
from one registered and never read). What does not fit is pinned here, not inferred from what the
code does today: the positions each model offers, the blocks refused at each (a 2-D block on a token
map, a split-path conv block on a depthwise conv), each with a clear AttnSurgeonError, and the
blocks that have no identity init. The registry drives the rest: a new block is expected to fit
everywhere else, and is covered without editing the test.
"""

from __future__ import annotations

import copy

import pytest
import torch

from attnsurgeon import AttnSurgeonError, apply_plan, inspect_model
from attnsurgeon.blocks import REGISTRY, build_block
from attnsurgeon.core.positions import POSITIONS

MODELS = {  # model -> input size (vit_b_16 built for 64 px: 16 patches, the same blocks and tokens layout as at 224)
    "resnet50": (3, 64, 64),
    "resnet18": (3, 64, 64),
    "mobilenet_v3_large": (3, 64, 64),
    "convnext_tiny": (3, 64, 64),
    "vit_b_16": (3, 64, 64),
}
OFFERED = {  # model -> the positions its blocks offer (vit_b_16: one stage of plain MLP/attention blocks)
    "resnet50": POSITIONS,
    "resnet18": POSITIONS,
    "mobilenet_v3_large": POSITIONS,
    "convnext_tiny": POSITIONS,
    "vit_b_16": ("standard", "pre", "post", "identity"),
}
TWO_D_ONLY = {"lcbam", "coord", "scoord", "ela", "strip", "bam"}  # they pool or convolve over H and W separately
REFUSED = {  # (model, position) -> the zoo blocks that fit no site there, and what their error says
    **{("vit_b_16", p): (TWO_D_ONLY, "needs a 2-D (H, W) feature map") for p in OFFERED["vit_b_16"]},
    # sk and splat split a conv's input channels over paths: a depthwise conv's cannot be split
    ("mobilenet_v3_large", "conv"): ({"sk", "splat"}, "groups"),
    ("convnext_tiny", "conv"): ({"sk", "splat"}, "groups"),
}
NO_IDENTITY = {"sk", "splat"}  # sk and splat cannot reproduce the conv they replace (simam: the α-gate)


def allowed_positions(info) -> tuple[str, ...]:
    """The positions a block's kind allows (a conv-replacing block: only `conv`)."""
    return info.positions


def test_the_blocks_without_an_identity_init_are_the_pinned_ones(resnet18):
    """Every other block builds with init='identity'; these refuse it, by name (resnet18's layer1.0 sites)."""

    _, anatomy = inspect_model(resnet18(), input_size=(3, 64, 64))
    block = anatomy.blocks[0]
    refused = set()
    for name, info in REGISTRY.items():
        site = block.sites[info.position if info.position in block.sites else "3x3"]
        try:
            build_block(name, site.channels, "identity", size=site.size, conv=site.conv)
        except AttnSurgeonError as exc:
            assert "identity" in str(exc), exc
            refused.add(name)
    assert refused == NO_IDENTITY


@pytest.fixture(
    scope="module", params=[m if m == "resnet18" else pytest.param(m, marks=pytest.mark.slow) for m in MODELS]
)
def traced(request):
    import torchvision

    torch.manual_seed(0)
    kwargs = {"image_size": MODELS["vit_b_16"][-1]} if request.param == "vit_b_16" else {}
    model = torchvision.models.get_model(request.param, weights=None, **kwargs).eval()
    if (
        request.param == "vit_b_16"
    ):  # torchvision zero-inits its head: every output would be the bias, whatever the blocks do
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    size = MODELS[request.param]
    _, anatomy = inspect_model(model, input_size=size)
    x = torch.randn(1, *size)
    # nn.MultiheadAttention's fused path (taken where nothing needs a gradient) differs in the last bits from its plain
    # one: the wiring check's gradients would mix the two, so the base and the modified models both take the plain one
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    with torch.no_grad():
        y = model(x)
    yield request.param, model, anatomy, x, y
    torch.backends.mha.set_fastpath_enabled(fastpath)


def _plans(anatomy):
    """position -> (model block, zoo block, has an identity init): every zoo block that fits there, spread round-robin
    over the model's blocks (several on one block stack up, as a plan's insertions do); and
    ("refused", position) -> {zoo block: reason} for those that fit no site there."""
    out = {}
    for position in POSITIONS:
        sites = [(b.name, b.sites[position]) for b in anatomy.blocks if position in b.sites]
        if not sites:
            continue
        pairs, refused = [], {}
        for k, (name, info) in enumerate(REGISTRY.items()):
            if position not in allowed_positions(info):
                continue
            for block, site in sites[k % len(sites) :] + sites[: k % len(sites)]:
                try:
                    build_block(name, site.channels, size=site.size, conv=site.conv)
                except AttnSurgeonError as exc:
                    refused.setdefault(name, str(exc))
                    continue
                pairs.append((block, name, name not in NO_IDENTITY))
                refused.pop(name, None)
                break
        out[position] = pairs
        out[("refused", position)] = refused
    return out


def test_every_block_at_every_position_is_an_exact_identity_at_init(traced):
    """Blocks with an identity init give exactly the base outputs (simam through the α-gate); the others (sk, splat:
    no identity exists) go in with their default init and must run, keeping the output's shape.
    Either way every inserted module's output must reach the model's."""
    from wiring import assert_each_is_read

    model_name, model, anatomy, x, y = traced
    plans = _plans(anatomy)
    assert [p for p in POSITIONS if p in plans] == list(OFFERED[model_name])
    for position in OFFERED[model_name]:
        refused, why = REFUSED.get((model_name, position), (set(), ""))
        fitting = {n for n, i in REGISTRY.items() if position in allowed_positions(i)} - refused
        assert plans[("refused", position)].keys() == refused, position
        for attn, reason in plans[("refused", position)].items():
            assert reason.startswith(attn) and why in reason, reason  # names the block and says why
        assert sorted(a for _, a, _ in plans[position]) == sorted(fitting), position
        for exact in (True, False):
            pairs = [(b, a) for b, a, ident in plans[position] if ident == exact]
            if not pairs:
                continue
            init = "identity" if exact else "default"
            specs = [{"attn": attn, "position": position, "blocks": [block], "init": init} for block, attn in pairs]
            gm, report = apply_plan(model, specs, input_size=MODELS[model_name])
            assert sorted(i.attn for i in report.insertions) == sorted(a for _, a in pairs)
            out = assert_each_is_read(gm.eval(), [i.module for i in report.insertions], lambda gm=gm: gm(x))
            if exact:
                assert torch.equal(out, y), (model_name, position, pairs)
                added = sum(p.numel() for ins in report.insertions for p in gm.get_submodule(ins.module).parameters())
                assert report.params["delta"] == added
            else:
                assert out.shape == y.shape and torch.isfinite(out).all(), (model_name, position, pairs)


@pytest.mark.slow
def test_identity_blocks_learn_and_stay_exact_in_train_mode(resnet18):
    """resnet18, train mode (batch-norm on batch statistics): outputs equal, and the new parameters get gradients."""

    torch.manual_seed(0)
    base = resnet18().train()
    x = torch.randn(2, 3, 64, 64)
    _, anatomy = inspect_model(base, input_size=(3, 64, 64))
    plans = _plans(anatomy)
    for position in POSITIONS:
        pairs = [(b, a) for b, a, ident in plans.get(position, []) if ident]
        if pairs:
            model = copy.deepcopy(base)
            y = copy.deepcopy(base)(x)
            specs = [{"attn": a, "position": position, "blocks": [b], "init": "identity"} for b, a in pairs]
            gm, report = apply_plan(model, specs, input_size=(3, 64, 64))
            gm.train()
            out = gm(x)
            assert torch.equal(out, y), (position, pairs)
            # two steps: some identity inits (a zeroed last layer) pass gradient to the rest from the second on
            opt = torch.optim.SGD(gm.parameters(), lr=0.1)
            for _ in range(2):
                opt.zero_grad()
                gm(x).square().mean().backward()
                opt.step()
            for ins in report.insertions:
                params = list(gm.get_submodule(ins.module).parameters())
                if params:
                    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params), (ins.attn, position)


@pytest.mark.slow
def test_flop_breakdown_of_every_block_sums_to_the_delta():
    """Profile resnet18 with every block of the zoo at its natural position: every op they use is
    counted, and the per-insertion MACs and parameters sum exactly to the totals' deltas."""
    import torchvision

    from attnsurgeon import profile

    torch.manual_seed(0)
    base = torchvision.models.resnet18(weights=None).eval()
    _, anatomy = inspect_model(base, input_size=(3, 64, 64))
    plans = _plans(anatomy)
    specs = []
    for name, info in REGISTRY.items():
        pairs = [(b, a) for b, a, _ in plans.get(info.position, []) if a == name]
        assert pairs, f"{name} fits no block of resnet18 at its natural position {info.position}"
        specs.append({"attn": name, "position": info.position, "blocks": [pairs[0][0]]})
    result = profile(base, plan=specs, input_size=(3, 64, 64), min_run_time=0.01, max_run_time=0.05)
    data = result.to_dict()
    assert result.uncounted_ops == {}, result.uncounted_ops
    assert result.unattributed_macs == 0
    assert sum(i.macs for i in result.insertions) == data["delta"]["macs"] > 0
    assert sum(i.params for i in result.insertions) == data["delta"]["params"]
    assert sorted(i.attn for i in result.insertions) == sorted(REGISTRY)


def test_the_registry_reaches_the_cli_the_docs_and_the_zoo_recipe(cli):
    """Every block and option declared once reaches `list attn --json`, every inserting command's flags,
    the docs' zoo table and the shipped zoo recipe — nothing is kept by hand in a second list."""
    import json
    from pathlib import Path

    from attnsurgeon.blocks.options import OPTIONS
    from attnsurgeon.planning.recipes import read_recipe

    code, out, err = cli("list", "attn", "--json")
    assert code == 0, err
    listed = {b["name"]: b for b in json.loads(out)["blocks"]}
    assert list(listed) == list(REGISTRY)
    for name, info in REGISTRY.items():
        assert listed[name]["position"] == info.position and listed[name]["position"] in listed[name]["positions"]
        assert {o["name"]: o["default"] for o in listed[name]["options"]} == info.options
    used = {k for info in REGISTRY.values() for k in info.options}
    assert used == set(OPTIONS)  # no option declared that no block takes
    for command in ("insert", "profile", "sweep", "explain"):
        code, out, _ = cli(command, "--help")
        flat = " ".join(out.split())
        missing = [o.flag for o in OPTIONS.values() if o.flag not in flat]
        assert code == 0 and not missing, (command, missing)
    root = Path(__file__).resolve().parent.parent
    readme = (root / "docs" / "blocks.md").read_text()  # the zoo table
    assert [
        n for n in REGISTRY if f"| `{n}` |" not in readme and f"`{n}` /" not in readme and f"/ `{n}` |" not in readme
    ] == []
    zoo = read_recipe(str(root / "recipes" / "zoo-resnet50.yaml"))
    assert sorted(c.insertions[0].attn for c in zoo.configurations) == sorted(REGISTRY)
    assert all(c.insertions[0].position == REGISTRY[c.insertions[0].attn].position for c in zoo.configurations)
