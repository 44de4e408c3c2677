"""Every block of the zoo at every position its kind allows, on five kinds of network.

resnet50 (bottleneck), resnet18 (basic block), mobilenet_v3_large (inverted residual), convnext_tiny
(channels-last blocks) and vit_b_16 (tokens). One surgery per (model, position) carries every block
that fits there, each on its own block of the model, all with ``init='identity'``: the rewritten
model must then give exactly the base model's outputs (so every block is wired in, in the right
layout, and is an exact identity at init), and the parameters must grow by exactly the new modules'.
A block that does not fit a site (a 2-D block on a token map, a kernel larger than the map) must
say so with a clear AttnSurgeonError, never a traceback — and on the convolutional networks every
block must fit somewhere. The registry drives the test: a new block is covered without editing it.
"""

from __future__ import annotations

import copy

import pytest
import torch

from attnsurgeon import AttnSurgeonError, apply_plan
from attnsurgeon.api import inspect_model
from attnsurgeon.blocks import REGISTRY, build_block
from attnsurgeon.positions import POSITIONS

MODELS = {  # model -> input size (vit_b_16 takes 224 only)
    "resnet50": (3, 64, 64),
    "resnet18": (3, 64, 64),
    "mobilenet_v3_large": (3, 64, 64),
    "convnext_tiny": (3, 64, 64),
    "vit_b_16": (3, 224, 224),
}
CONVNETS = ("resnet50", "resnet18", "mobilenet_v3_large", "convnext_tiny")


def allowed_positions(info) -> tuple[str, ...]:
    """The positions a block's kind allows (a conv-replacing block: only `conv`)."""
    return info.positions


def starts_as_identity(name: str, site) -> bool:
    """Whether the block has an identity init (simam has no parameters; sk/splat cannot reproduce a conv)."""
    try:
        build_block(name, site.channels, "identity", size=site.size, conv=site.conv)
    except AttnSurgeonError as exc:
        assert "identity" in str(exc), exc  # refused for that reason, by name
        return False
    return True


@pytest.fixture(scope="module", params=list(MODELS))
def traced(request):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(request.param, weights=None).eval()
    size = MODELS[request.param]
    _, anatomy = inspect_model(model, input_size=size)
    x = torch.randn(1, *size)
    with torch.no_grad():
        y = model(x)
    return request.param, model, anatomy, x, y


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
            for block, site in sites[k % len(sites):] + sites[: k % len(sites)]:
                try:
                    build_block(name, site.channels, size=site.size, conv=site.conv)
                except AttnSurgeonError as exc:
                    refused.setdefault(name, str(exc))
                    continue
                pairs.append((block, name, starts_as_identity(name, site)))
                refused.pop(name, None)
                break
        out[position] = pairs
        out[("refused", position)] = refused
    return out


def test_every_block_at_every_position_is_an_exact_identity_at_init(traced):
    """Blocks with an identity init give exactly the base outputs; the others (simam, sk, splat:
    no identity exists) go in with their default init and must run, keeping the output's shape."""
    model_name, model, anatomy, x, y = traced
    plans = _plans(anatomy)
    inserted: set[str] = set()
    for position in POSITIONS:
        for exact in (True, False):
            pairs = [(b, a) for b, a, ident in plans.get(position, []) if ident == exact]
            if not pairs:
                continue
            init = "identity" if exact else "default"
            specs = [{"attn": attn, "position": position, "blocks": [block], "init": init} for block, attn in pairs]
            gm, report = apply_plan(model, specs, input_size=MODELS[model_name])
            gm.eval()
            with torch.no_grad():
                out = gm(x)
            if exact:
                assert torch.equal(out, y), (model_name, position, pairs)
                added = sum(p.numel() for ins in report.insertions for p in gm.get_submodule(ins.module).parameters())
                assert report.params["delta"] == added
            else:
                assert out.shape == y.shape and torch.isfinite(out).all(), (model_name, position, pairs)
            assert sorted(i.attn for i in report.insertions) == sorted(a for _, a in pairs)
            inserted.update(a for _, a in pairs)
        for attn, reason in plans.get(("refused", position), {}).items():
            assert reason.startswith(attn) or attn in reason, reason  # names the block and says why
    if model_name in CONVNETS:  # every gate fits a convolutional network somewhere; sk/splat the ResNets'
        # dense 3×3 convs (a depthwise conv cannot be split into their paths: refused above, by name)
        expected = {n for n, i in REGISTRY.items() if i.kind == "gate" or model_name.startswith("resnet")}
        assert expected <= inserted, sorted(expected - inserted)


def test_identity_blocks_learn_and_stay_exact_in_train_mode():
    """resnet18, train mode (batch-norm on batch statistics): outputs equal, and the new parameters get gradients."""
    import torchvision

    torch.manual_seed(0)
    base = torchvision.models.resnet18(weights=None).train()
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
    the README's table and the shipped zoo recipe — nothing is kept by hand in a second list."""
    import json
    from pathlib import Path

    from attnsurgeon.blocks.options import OPTIONS
    from attnsurgeon.recipes import read_recipe

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
    readme = (root / "README.md").read_text()
    assert [n for n in REGISTRY if f"| `{n}` |" not in readme and f"`{n}` /" not in readme and f"/ `{n}` |" not in readme] == []
    zoo = read_recipe(str(root / "recipes" / "zoo-resnet50.yaml"))
    assert sorted(c.insertions[0].attn for c in zoo.configurations) == sorted(REGISTRY)
    assert all(c.insertions[0].position == REGISTRY[c.insertions[0].attn].position for c in zoo.configurations)
