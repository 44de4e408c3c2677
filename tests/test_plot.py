"""The insertion map (insert/inspect --plot) and profile's per-insertion bars (profile --plot)."""

import xml.etree.ElementTree as ET
from types import SimpleNamespace

import matplotlib
import pytest
import torch

from attnsurgeon import InsertionSpec, apply_plan, inspect_model
from attnsurgeon.pictures.plot import FALLBACK_STYLE, POSITION_STYLES, draw_insertion_map, save_figure

from formulas import cbam_hidden, cbam_macs, eca_kernel, eca_macs, se_hidden, se_macs

# five positions of the SENet integration study, stacked in one plan on resnet18
PLAN = [
    InsertionSpec("se", "standard", stages=[1]),
    InsertionSpec("cbam", "pre", stages=[2]),
    InsertionSpec("eca", "identity", stages=[3]),
    InsertionSpec("se", "3x3", stages=[4]),
    InsertionSpec("eca", "post", stages=[4]),
]


@pytest.fixture(scope="module")
def stacked_models():
    """resnet18 at 64 px, its anatomy, and PLAN applied to it (tests read them, none changes them)."""
    loaded, anatomy = inspect_model("resnet18", input_size=64)
    modified, report = apply_plan(loaded, PLAN, input_size=64)
    return loaded, anatomy, modified, report


@pytest.fixture(scope="module")
def stacked(stacked_models):
    _, anatomy, _, report = stacked_models
    return anatomy, report


def _markers(fig, prefix="insertion:"):
    return {
        line.get_gid()[len(prefix) :]: line
        for ax in fig.axes
        for line in ax.lines
        if (line.get_gid() or "").startswith(prefix)
    }


def test_one_marker_per_inserted_module_with_a_shape_per_position(stacked):
    anatomy, report = stacked
    fig = draw_insertion_map(anatomy, report.insertions)
    drawn = _markers(fig)
    assert len(report.insertions) == 2 + 2 + 2 + 2 + 2  # two blocks per stage, five positions
    assert sorted(drawn) == sorted(i.module for i in report.insertions)  # exactly one element each
    by_position = {}
    for ins in report.insertions:
        by_position.setdefault(ins.position, set()).add(drawn[ins.module].get_marker())
    assert all(len(m) == 1 for m in by_position.values())  # one shape per position...
    shapes = [next(iter(m)) for m in by_position.values()]
    assert len(set(shapes)) == 5  # ... and five positions, five shapes
    # and where they sit on their block's box tells them apart too: pre, 3x3 and standard along
    # the residual branch from left to right, identity under the box, post past its right edge
    boxes = fig.axes[0].patches
    xy = {i.module: (drawn[i.module].get_xdata()[0], drawn[i.module].get_ydata()[0]) for i in report.insertions}

    def box_of(x, y):
        return next(
            b
            for b in boxes
            if b.get_x() <= x <= b.get_x() + b.get_width() + 0.34 and b.get_y() - 0.1 <= y <= b.get_y() + b.get_height()
        )

    def where(module):
        x, y = xy[module]
        b = box_of(x, y)
        return (x - b.get_x()) / b.get_width(), (y - b.get_y()) / b.get_height()

    pre, se3, std = where("layer2.0.cbam_pre"), where("layer4.0.se_3x3"), where("layer1.0.se")
    assert pre[0] < 0.3 < se3[0] < 0.7 < std[0] < 1 and pre[1] == se3[1] == std[1]
    assert where("layer3.0.eca_identity")[1] < 0 < pre[1]  # under the box
    assert where("layer4.0.eca_post")[0] > 1  # past the merge


def test_colour_is_the_share_of_the_added_parameters(stacked):
    anatomy, report = stacked
    fig = draw_insertion_map(anatomy, report.insertions)
    drawn = _markers(fig)
    biggest = max(report.insertions, key=lambda i: i.params)
    smallest = min(report.insertions, key=lambda i: i.params)
    bar = next(a for a in fig.axes if "share of the added parameters" in a.get_xlabel())
    total = sum(i.params for i in report.insertions)
    share = {i.module: 100 * i.params / total for i in report.insertions}
    assert bar.get_xlim()[1] == pytest.approx(share[biggest.module])  # the scale ends at the biggest share
    # plasma, reversed, without its palest 12 %: the biggest share is its darkest colour
    plasma_r = matplotlib.colormaps["plasma_r"]
    assert drawn[biggest.module].get_markerfacecolor() == pytest.approx(plasma_r(1.0))
    expected = plasma_r(0.12 + 0.88 * share[smallest.module] / share[biggest.module])
    assert drawn[smallest.module].get_markerfacecolor() == pytest.approx(expected, abs=0.01)


def test_the_svg_has_one_element_per_insertion(stacked, tmp_path):
    anatomy, report = stacked
    path = save_figure(draw_insertion_map(anatomy, report.insertions, title="t"), tmp_path / "map.svg")
    ids = [
        g.get("id")
        for g in ET.parse(path).iter("{http://www.w3.org/2000/svg}g")
        if (g.get("id") or "").startswith("insertion:")
    ]
    assert sorted(ids) == sorted(f"insertion:{i.module}" for i in report.insertions)
    assert not list(tmp_path.glob(".*part*"))  # written through a temporary file, nothing left over


def test_new_and_unknown_positions_are_drawn(stacked):
    """`stage` and `conv` (added by another branch) have their own shapes; a position this module
    does not know gets the fallback marker with its name written beside it."""
    anatomy, _ = stacked
    fake = [
        SimpleNamespace(block="layer2.1", stage=2, position="stage", module="layer2.se_stage", params=10, attn="se"),
        SimpleNamespace(block="layer3.0", stage=3, position="conv", module="layer3.0.conv2", params=30, attn="sk"),
        SimpleNamespace(block="layer4.1", stage=4, position="sideways", module="layer4.1.x", params=5, attn="se"),
    ]
    fig = draw_insertion_map(anatomy, fake)
    drawn = _markers(fig)
    assert drawn["layer2.se_stage"].get_marker() == POSITION_STYLES["stage"].marker
    assert drawn["layer3.0.conv2"].get_marker() == POSITION_STYLES["conv"].marker
    assert drawn["layer4.1.x"].get_marker() == FALLBACK_STYLE.marker
    assert any(t.get_text() == "sideways" for t in fig.axes[0].texts)
    assert (
        len({POSITION_STYLES[p].marker for p in POSITION_STYLES} | {FALLBACK_STYLE.marker}) == len(POSITION_STYLES) + 1
    )


def test_many_blocks_fold_into_rows_and_long_names_are_shortened():
    from attnsurgeon.pictures.plot import block_labels, short_name

    prefix, labels = block_labels([f"features.denseblock3.denselayer{k}.conv1" for k in range(1, 25)])
    assert prefix == "features.denseblock3."
    assert labels["features.denseblock3.denselayer17.conv1"] == "denselayer17.conv1"
    assert len(short_name("a" * 40)) == 18 and "…" in short_name("a" * 40)
    blocks = [
        SimpleNamespace(
            name=f"stages.0.blocks.{k}", kind="residual", channels=8, resolution=(4, 4), sites={"standard": 0}
        )
        for k in range(25)
    ]
    anatomy = SimpleNamespace(stages=[SimpleNamespace(index=1, name="stages.0", blocks=blocks)], blocks=blocks)
    fig = draw_insertion_map(anatomy, [], max_columns=10)
    boxes = [p for p in fig.axes[0].patches]
    assert len(boxes) == 25
    rows = sorted({round(p.get_y(), 3) for p in boxes})
    assert len(rows) == 3  # 10 + 10 + 5


@pytest.mark.slow
def test_cli_insert_and_inspect_plot(cli, tmp_path):
    out = tmp_path / "map.svg"
    code, stdout, err = cli(
        "insert", "resnet18", "--attn", "cbam", "--stages", "3,4", "--input-size", "64", "--plot", out
    )
    assert code == 0, err
    ids = [
        g.get("id")
        for g in ET.parse(out).iter("{http://www.w3.org/2000/svg}g")
        if (g.get("id") or "").startswith("insertion:")
    ]
    assert len(ids) == 4 and "Insertion map" in stdout
    png = tmp_path / "blocks.png"
    code, stdout, err = cli("inspect", "resnet18", "--input-size", "64", "--plot", png)
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (("--plot", "map.jpeg"), "cannot tell the figure format"),
        (("--plot", "nowhere/map.png"), "does not exist"),
        (("--plot", "m.png", "--plot-metric", "flops"), "--plot-metric must be one of params, macs"),
    ],
)
def test_cli_bad_plot_arguments_fail_before_any_work(cli, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    code, stdout, err = cli("insert", "no_such_model", "--attn", "se", *args)  # the plot check comes first
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_insertion_macs_match_the_formulas_and_the_models_difference(stacked_models):
    """--plot-metric macs: per-module MACs (fvcore with the element-wise handles), each the block's analytic count
    at its place, and their convolutions summing to what stock fvcore counts on the two whole models."""
    from fvcore.nn import FlopCountAnalysis

    from attnsurgeon.profiling.macs import count_insertion_macs

    loaded, _, modified, report = stacked_models
    values = count_insertion_macs(loaded.model, modified, report)
    # resnet18 at 64 px: layer1 64 ch at 16x16, layer2 128 at 8x8, layer3 256 at 4x4, layer4 512 at 2x2; pre sits on
    # a block's input (layer2.0 takes layer1's map), identity on the shortcut's output, 3x3 after the first conv
    places = {
        "layer1.0.se": ("se", 64, 16),
        "layer1.1.se": ("se", 64, 16),
        "layer2.0.cbam_pre": ("cbam", 64, 16),
        "layer2.1.cbam_pre": ("cbam", 128, 8),
        "layer3.0.eca_identity": ("eca", 256, 4),
        "layer3.1.eca_identity": ("eca", 256, 4),
        "layer4.0.se_3x3": ("se", 512, 2),
        "layer4.1.se_3x3": ("se", 512, 2),
        "layer4.0.eca_post": ("eca", 512, 2),
        "layer4.1.eca_post": ("eca", 512, 2),
    }
    macs = {
        "se": lambda c, h: se_macs(c, h, h, se_hidden(c)),
        "cbam": lambda c, h: cbam_macs(c, h, h, cbam_hidden(c)),
        "eca": lambda c, h: eca_macs(c, h, h, eca_kernel(c)),
    }
    assert values == {module: macs[kind](c, h) for module, (kind, c, h) in places.items()}
    # stock fvcore counts only the convolutions and norms: SE's two 1x1 convs, CBAM's shared MLP (twice), its 7x7
    # spatial conv and BN (2 per element in eval), ECA's 1-D conv; so the difference of the two whole models, each
    # counted on its own, is theirs alone
    x = torch.randn(1, 3, 64, 64)
    stock = [
        FlopCountAnalysis(m.eval(), (x,)).unsupported_ops_warnings(False).uncalled_modules_warnings(False).total()
        for m in (loaded.model, modified)
    ]
    convs = {
        "se": lambda c, h: 2 * c * se_hidden(c),
        "eca": lambda c, h: eca_kernel(c) * c,
        "cbam": lambda c, h: 4 * c * cbam_hidden(c) + 2 * 7 * 7 * h * h + 2 * h * h,
    }
    assert stock[1] - stock[0] == sum(convs[kind](c, h) for kind, c, h in places.values())


def _saved_total(model, x):
    """Bytes of every distinct non-parameter storage autograd keeps in one training forward pass."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            kept[s.data_ptr()] = s.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    model.eval()
    return sum(kept.values())


@pytest.mark.slow
@pytest.mark.parametrize("position", ["standard", "pre", "post"])
def test_memory_kept_for_backward_per_insertion(position):
    """SE keeps a map the size of its input (N·C·H·W: its input at the standard position, which the
    base model does not keep; its output at pre and post, which the next conv keeps in place of the
    input it kept before) plus its pooled vector, hidden ReLU output and gate. The rows add up to
    the difference of the whole models' kept bytes, measured independently."""
    from attnsurgeon.graph.parts import base_like
    from attnsurgeon.planning.settings import Settings
    from attnsurgeon.profiling.measure import saved_bytes_by_module

    loaded, _ = inspect_model("resnet18", input_size=64)
    # blocks whose input has their own size (not a stage's first block, for pre); post not on the
    # last block, whose output feeds the pooling head, which keeps nothing
    blocks = ["layer1.1", "layer4.0" if position == "post" else "layer4.1"]
    modified, report = apply_plan(loaded, [InsertionSpec("se", position, blocks=blocks)], input_size=64)
    n = 3
    x = torch.randn(n, 3, 64, 64)
    saved = saved_bytes_by_module(
        modified,
        (x,),
        [i.module for i in report.insertions],
        Settings("cpu", "float32", [n], "train", None, False, False, 1.0, 1.0),
    )
    for ins in report.insertions:
        c = ins.channels
        h = 64 // 4 if ins.stage == 1 else 64 // 32
        hidden = se_hidden(c)  # C/16 rounded to a multiple of 8, at least 8: 8 for 64 channels, 32 for 512
        assert saved[ins.module] == 4 * n * (c * h * h + c + hidden + c), ins.module
    assert sum(saved.values()) == _saved_total(modified, x) - _saved_total(base_like(loaded.model, None), x)


@pytest.mark.slow
def test_profile_plot_draws_the_bars(tmp_path):
    from attnsurgeon.pictures.plot import draw_costs
    from attnsurgeon.profiling import profile

    result = profile(
        "resnet18",
        attn="eca",
        stages=[4],
        input_size=64,
        mode="train",
        batch_sizes=[2],
        min_run_time=0.05,
        max_run_time=0.1,
    )
    assert all(i.memory_bytes and i.memory_bytes > 0 for i in result.insertions)
    assert result.unattributed_memory_bytes is not None
    assert result.to_dict()["insertions"][0]["memory_bytes"] == result.insertions[0].memory_bytes
    fig = draw_costs(result)
    bars = [ax.patches for ax in fig.axes if ax.patches]
    assert len(bars) == 3 and all(len(b) == len(result.insertions) for b in bars)  # params, MACs, memory
    assert [b.get_width() for b in bars[0]] == [i.params for i in result.insertions]
    assert "Not attributable" in " ".join(t.get_text() for t in fig.texts)
    save_figure(fig, tmp_path / "costs.png")


@pytest.mark.slow
def test_attributing_memory_keeps_no_activation_alive():
    """saved_bytes_by_module runs one forward pass under saved_tensors_hooks; none of its activations
    may outlive the call (a pack hook returning its tensor kept them in a reference cycle that Python's
    collector cannot see: a 22-row train sweep of ResNet-50 ran out of memory)."""
    import gc
    import weakref

    import torchvision

    from attnsurgeon import insert
    from attnsurgeon.planning.settings import Settings
    from attnsurgeon.profiling.measure import saved_bytes_by_module

    gm, report = insert(torchvision.models.resnet18(weights=None), "se", stages=[1], input_size=(3, 32, 32))
    refs = []
    handle = gm.get_submodule("layer1.0.se").register_forward_hook(lambda m, a, out: refs.append(weakref.ref(out)))
    saved = saved_bytes_by_module(gm, (torch.randn(2, 3, 32, 32),), [i.module for i in report.insertions], Settings())
    handle.remove()
    gc.collect()
    assert saved["layer1.0.se"] > 0 and refs and refs[0]() is None


@pytest.mark.parametrize("attn", ["sk", "splat"])
def test_the_map_and_profile_give_one_mac_count_per_insertion_for_conv_blocks(attn):
    """sk and splat take the place of a conv, with its BN and activation: the map's --plot-metric macs counts
    the swap as profile's table does (the map once left out what the block took along)."""
    import attnsurgeon
    from attnsurgeon.loading.models import build_model
    from attnsurgeon.profiling import profile
    from attnsurgeon.profiling.macs import count_insertion_macs

    loaded = build_model("resnet18")
    modified, report = attnsurgeon.insert(loaded, attn=attn, stages=[4], input_size=32)
    assert any(i.took_along for i in report.insertions), "the block took nothing along: the test tests nothing"
    on_the_map = count_insertion_macs(loaded.model, modified, report)
    result = profile(loaded, attn=attn, stages=[4], input_size=32, min_run_time=0.01, max_run_time=0.05)
    assert on_the_map == {i.module: i.macs for i in result.insertions}
