"""Any rank: 1-D (N, C, L), 2-D and 3-D (N, C, T, H, W) feature maps, channels first and last.

The blocks are checked against independent references: a 1-D or 3-D map pooled over all its
spatial axes is the same as the 2-D map it reshapes to, so timm's own 2-D modules with the same
weights give the expected outputs; the keep-depth variants equal timm's 2-D module applied frame
by frame. Video models (r3d_18 and friends) and a user's 1-D audio net go through insert, profile
and export."""

import json
import textwrap

import pytest
import torch
import torch.nn.functional as F
from timm.layers import EcaModule, SEModule
from timm.layers.cbam import CbamModule
from torch import nn

import attnsurgeon
from attnsurgeon import AttnSurgeonError
from attnsurgeon.blocks import build_block
from attnsurgeon.core.positions import POSITIONS
from attnsurgeon.graph.layout import Layout, resolve_input_size

from formulas import n_params
from wiring import assert_each_is_read

VIDEO = (3, 4, 32, 32)  # C, T, H, W: small enough for one forward pass per test


# --------------------------------------------------------------------------- the layout record


@pytest.mark.parametrize(
    "ndim, caxis, name",
    [(3, 1, "NCL"), (3, 2, "NLC"), (4, 1, "NCHW"), (4, 3, "NHWC"), (5, 1, "NCDHW"), (5, 4, "NDHWC")],
)
def test_layout_names_and_permutations(ndim, caxis, name):
    layout = Layout.of(ndim, caxis)
    assert layout.name == name and Layout.parse(name) == layout and layout.dims == ndim - 2
    shape = tuple(range(2, 2 + ndim))
    x = torch.randn(shape)
    first = x.permute(layout.to_channels_first()) if layout.channels_last else x
    assert first.shape[1] == shape[caxis] and first.shape[2:] == layout.size(shape)
    back = first.permute(layout.from_channels_first()) if layout.channels_last else first
    assert torch.equal(back, x)


def test_layouts_that_take_no_block():
    assert Layout.of(2, 1) is None  # (N, C): no spatial axis
    assert Layout.of(6, 1) is None
    assert Layout.of(4, 2) is None  # channels in the middle
    assert Layout.of(4, None) is None


@pytest.mark.parametrize(
    "value, default, expected",
    [
        (None, (3, 224, 224), (3, 224, 224)),
        (64, (3, 224, 224), (3, 64, 64)),
        ("160x128", (3, 224, 224), (3, 160, 128)),
        ("1,64,64", (3, 224, 224), (1, 64, 64)),
        (112, (3, 16, 112, 112), (3, 16, 112, 112)),
        ("64", (3, 16, 112, 112), (3, 16, 64, 64)),
        ("8,64,64", (3, 16, 112, 112), (3, 8, 64, 64)),
        ("3,8,112,112", (3, 224, 224), (3, 8, 112, 112)),  # another rank than the default: taken whole
        ("1,16000", None, (1, 16000)),
        ("8000", (1, 16000), (1, 8000)),
    ],
)
def test_input_size_of_any_rank(value, default, expected):
    assert resolve_input_size(value, default) == expected


def test_input_size_errors():
    with pytest.raises(AttnSurgeonError, match="give --input-size"):
        resolve_input_size(None, None)
    with pytest.raises(AttnSurgeonError, match="give its channels too"):
        resolve_input_size(16000, None)
    with pytest.raises(AttnSurgeonError, match="expected S"):
        resolve_input_size("3,16,x", (3, 224, 224))
    with pytest.raises(AttnSurgeonError, match="positive"):
        resolve_input_size("3,0,4", (3, 224, 224))


# --------------------------------------------------------------------------- blocks against timm's 2-D modules


def _copy(src: nn.Module, dst: nn.Module) -> None:
    """Load ``src``'s weights into ``dst``, reshaping 1x1 (or k) kernels between ranks."""
    theirs = src.state_dict()
    dst.load_state_dict({k: theirs[k].reshape(v.shape) for k, v in dst.state_dict().items()})


@pytest.mark.parametrize("shape", [(2, 32, 20), (2, 32, 3, 5, 6)])
def test_se_and_eca_pool_every_spatial_axis_like_timms_2d_module(shape):
    torch.manual_seed(0)
    x = torch.randn(shape)
    flat = x.reshape(2, 32, -1, 1)  # the same values as an (N, C, THW, 1) image: pooled alike
    size = shape[2:]
    for name, reference in (("se", SEModule(32, rd_channels=8)), ("eca", EcaModule(32))):
        block = build_block(name, 32, size=size)
        _copy(reference, block)
        assert block(x).shape == x.shape
        torch.testing.assert_close(block(x).reshape(flat.shape), reference(flat), rtol=0, atol=1e-6)


def test_keep_depth_gates_every_frame_like_timms_2d_module():
    torch.manual_seed(0)
    x = torch.randn(2, 32, 3, 5, 6)
    for name, reference in (("se", SEModule(32, rd_channels=8)), ("eca", EcaModule(32))):
        block = build_block(name, 32, size=(3, 5, 6), keep_depth=True)
        _copy(reference, block)
        expected = torch.stack([reference(x[:, :, t]) for t in range(3)], dim=2)
        torch.testing.assert_close(block(x), expected, rtol=0, atol=1e-6)
    with pytest.raises(AttnSurgeonError, match="keep_depth gates each .* this one has 2 spatial dimensions"):
        build_block("se", 32, size=(5, 6), keep_depth=True)


def test_cbam_of_any_rank_against_a_functional_reference():
    torch.manual_seed(0)
    for shape in [(2, 32, 20), (2, 32, 3, 5, 6)]:
        x = torch.randn(shape)
        dims = len(shape) - 2
        block = build_block("cbam", 32, size=shape[2:], kernel_size=3).eval()
        reference = CbamModule(32, rd_channels=2, spatial_kernel_size=3).eval()
        _copy(reference.channel, block.channel)
        # channel gate: as timm's on the (N, C, THW, 1) image it reshapes to
        gated = reference.channel(x.reshape(2, 32, -1, 1)).reshape(shape)
        torch.testing.assert_close(block.channel(x), gated, rtol=0, atol=1e-6)
        # spatial gate: a k^d conv and a BN over the [mean, max] maps
        spatial = block.spatial.conv
        with torch.no_grad():
            spatial.conv.weight.normal_()
            spatial.bn.running_var.fill_(2.0)
        conv = {1: F.conv1d, 3: F.conv3d}[dims]
        maps = torch.cat([gated.mean(1, keepdim=True), gated.amax(1, keepdim=True)], 1)
        a = conv(maps, spatial.conv.weight, padding=1)
        a = F.batch_norm(a, spatial.bn.running_mean, spatial.bn.running_var, spatial.bn.weight, spatial.bn.bias)
        torch.testing.assert_close(block(x), gated * torch.sigmoid(a), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_parameter_counts_follow_the_2d_formulas(dims):
    size = (6,) * dims
    c = 64

    assert n_params(build_block("se", c, size=size)) == 2 * c * 8 + 8 + c  # hidden = 64/16 rounded up to 8
    assert n_params(build_block("eca", c, size=size)) == 3  # adaptive k for 64 channels
    assert (
        n_params(build_block("cbam", c, size=size, kernel_size=5)) == 2 * c * 4 + 2 * 5**dims + 2
    )  # MLP, k^d conv, BN


@pytest.mark.parametrize("dims", [1, 3])
@pytest.mark.parametrize("attn", ["se", "eca", "cbam"])
def test_identity_init_is_exact_in_any_rank(attn, dims):
    torch.manual_seed(0)
    x = torch.randn((2, 16) + (5,) * dims)
    block = build_block(attn, 16, "identity", size=(5,) * dims, **({"reduction": 4} if attn != "eca" else {}))
    assert torch.equal(block.eval()(x), x) and torch.equal(block.train()(x), x)


# --------------------------------------------------------------------------- video models


def test_video_models_take_clips_by_default():
    assert attnsurgeon.load_model("r3d_18").input_size == (3, 16, 112, 112)
    assert attnsurgeon.load_model("mvit_v2_s").input_size == (3, 16, 224, 224)
    assert attnsurgeon.load_model("s3d").input_size == (3, 16, 224, 224)


def _blocks_at(report, position):
    return [i for i in report.insertions if i.position == position]


@pytest.mark.slow
@pytest.mark.parametrize("attn", ["se", "eca", "cbam"])
def test_r3d_18_at_every_position(attn):
    torch.manual_seed(0)
    base = attnsurgeon.load_model("r3d_18").model.eval()
    x = torch.randn(1, *VIDEO)
    with torch.no_grad():
        expected = base(x)
    _, anatomy = attnsurgeon.inspect_model(base, input_size=VIDEO)
    assert len(anatomy.blocks) == 8 and {b.layout for b in anatomy.blocks} == {"NCDHW"}
    for position in POSITIONS:
        if position not in attnsurgeon.blocks.get_block(attn).positions or not any(
            position in b.sites for b in anatomy.blocks
        ):
            continue
        offered = [b.name for b in anatomy.blocks if position in b.sites]
        model, report = attnsurgeon.insert(base, attn, position, blocks=offered, init="identity", input_size=VIDEO)
        assert len(report.insertions) == len(offered) and {i.layout for i in report.insertions} == {"NCDHW"}
        assert report.params["delta"] == sum(i.params for i in report.insertions) > 0
        out = assert_each_is_read(model.eval(), [i.module for i in report.insertions], lambda model=model: model(x))
        assert torch.equal(out, expected), position


def test_se_in_r3d_18_adds_the_2d_formula():
    _, report = attnsurgeon.insert("r3d_18", "se", input_size=VIDEO)
    # BasicBlocks of 64, 128, 256, 512 channels, two per stage: 2 C hidden + hidden + C, hidden = C/16 (≥ 8)
    hidden = {64: 8, 128: 8, 256: 16, 512: 32}
    assert report.params["delta"] == sum(2 * (2 * c * h + h + c) for c, h in hidden.items())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mc3_18", "r2plus1d_18"])
def test_other_video_resnets(name):
    """Frame-by-frame gates (keep_depth), identity-initialised: the base model's outputs, every gate read."""
    torch.manual_seed(0)
    base = attnsurgeon.load_model(name).model.eval()
    x = torch.randn(1, *VIDEO)
    with torch.no_grad():
        expected = base(x)
    model, report = attnsurgeon.insert(base, "eca", keep_depth=True, init="identity", input_size=VIDEO)
    assert len(report.insertions) == 8 and all(i.options.get("keep_depth") for i in report.insertions)
    out = assert_each_is_read(model.eval(), [i.module for i in report.insertions], lambda: model(x))
    assert out.shape == (1, 400) and torch.equal(out, expected)


@pytest.mark.slow
@pytest.mark.parametrize("name, stages, layout, count", [("s3d", None, "NCDHW", 77), ("swin3d_t", [4], "NDHWC", 4)])
def test_s3d_and_video_transformers_insert_and_run(name, stages, layout, count):
    """At their own clip size (16 frames of 224 × 224: shapes on the meta device), then run on a small clip: the
    identity-initialised model gives the base model's outputs and reads every block. swin3d_t's stage 4 is
    channels-last 5-D (2 blocks, 2 merges each); s3d's fixed 2×7×7 head pool is made adaptive so a 8×64×64 clip runs."""
    torch.manual_seed(0)
    loaded = attnsurgeon.load_model(name)
    base = loaded.model.eval()
    _, report = attnsurgeon.insert(loaded, "se", stages=stages)
    assert report.input_size == (3, 16, 224, 224)
    assert {i.layout for i in report.insertions} == {layout} and len(report.insertions) == count
    if name == "s3d":
        base.avgpool = nn.AdaptiveAvgPool3d(1)
    clip = (3, 8, 64, 64) if name == "s3d" else (3, 4, 64, 64)
    x = torch.randn(1, *clip)
    with torch.no_grad():
        expected = base(x)
    model, report = attnsurgeon.insert(base, "se", stages=stages, init="identity", input_size=clip)
    assert len(report.insertions) == count
    out = assert_each_is_read(model.eval(), [i.module for i in report.insertions], lambda: model(x))
    assert out.shape == (1, 400) and torch.equal(out, expected)


@pytest.mark.slow
def test_video_cli_and_profile(cli):
    code, out, err = cli("insert", "r3d_18", "--attn", "cbam", "--stages", "4", "--input-size", "3,4,32,32", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["input_size"] == [3, 4, 32, 32]
    assert {i["layout"] for i in report["insertions"]} == {"NCDHW"}
    assert [i["options"]["kernel_size"] for i in report["insertions"]] == [7, 7]
    code, out, err = cli(
        "insert", "r3d_18", "--attn", "se", "--keep-depth", "--stages", "4", "--input-size", "3,4,32,32", "--json"
    )
    assert code == 0, err
    assert [i["options"]["keep_depth"] for i in json.loads(out)["insertions"]] == [True, True]
    code, _, err = cli("insert", "resnet18", "--attn", "se", "--keep-depth", "--input-size", "64")
    assert code == 2 and "keep_depth" in err and "2 spatial dimensions" in err

    from attnsurgeon.profiling import profile

    result = profile(
        "r3d_18", "se", stages=[4], input_size=VIDEO, min_run_time=0.05, max_run_time=0.1, channels_last=True
    )  # channels_last_3d for 5-D clips
    c, t, h, w, hidden = 512, 1, 2, 2, 32  # layer4 of a 4x32x32 clip
    se_macs = c * t * h * w + c * hidden + hidden + hidden * c + c + c * t * h * w
    assert [i.macs for i in result.insertions] == [se_macs, se_macs]
    assert result.modified.macs - result.base.macs == 2 * se_macs and result.uncounted_ops == {}
    assert result.modified.memory[1].peak_bytes > 0 and result.modified.latency[1].median_ms > 0


@pytest.mark.slow
def test_video_model_exports_in_every_format(tmp_path):
    from attnsurgeon.saving.export import export, load

    torch.manual_seed(0)
    model, _ = attnsurgeon.insert("r3d_18", "eca", stages=[3, 4], input_size=VIDEO)
    model.eval()
    x = torch.randn(2, *VIDEO)
    with torch.no_grad():
        expected = model(x)
    for ext in ("safetensors", "pt2", "onnx", "ts"):
        written = export(model, tmp_path / f"m.{ext}")
        assert written.input_shape[1:] == list(VIDEO) and written.max_abs_diff <= 1e-4
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "m.safetensors")(x), expected)
        torch.testing.assert_close(torch.export.load(str(tmp_path / "m.pt2")).module()(x), expected, rtol=0, atol=1e-5)
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=0, atol=1e-4)


# --------------------------------------------------------------------------- a user's 1-D network

AUDIO_NET = textwrap.dedent("""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv1 = nn.Conv1d(c, c, 9, padding=4, bias=False)
            self.bn1 = nn.BatchNorm1d(c)
            self.conv2 = nn.Conv1d(c, c, 9, padding=4, bias=False)
            self.bn2 = nn.BatchNorm1d(c)

        def forward(self, x):
            out = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(x + self.bn2(self.conv2(out)))

    class AudioNet(nn.Module):
        def __init__(self, classes=10):
            super().__init__()
            self.stem = nn.Conv1d(1, 32, 80, stride=16)
            self.layer1 = nn.Sequential(Block(32), Block(32))
            self.head = nn.Linear(32, classes)

        def forward(self, x):
            return self.head(self.layer1(self.stem(x)).mean(-1))

    def build():
        return AudioNet()
""")


@pytest.fixture
def audio_net(tmp_path):
    path = tmp_path / "audio.py"
    path.write_text(AUDIO_NET)
    return f"{path}:build"


def _audio_branch(blk, t):
    return blk.bn2(blk.conv2(torch.relu(blk.bn1(blk.conv1(t)))))


# one AudioNet block with gate g where each position puts it (the positions' definitions)
_AUDIO_UNIT = {
    "standard": lambda x, g, blk: torch.relu(x + g(_audio_branch(blk, x))),
    "pre": lambda x, g, blk: torch.relu(x + _audio_branch(blk, g(x))),
    "post": lambda x, g, blk: g(torch.relu(x + _audio_branch(blk, x))),
    "identity": lambda x, g, blk: torch.relu(g(x) + _audio_branch(blk, x)),
    "3x3": lambda x, g, blk: torch.relu(x + blk.bn2(blk.conv2(g(torch.relu(blk.bn1(blk.conv1(x))))))),
}


def _audio_by_hand(net, x, position, gates):
    """AudioNet's forward written out, with gate k where ``position`` puts it in block k."""
    x = net.stem(x)
    for blk, g in zip(net.layer1, gates, strict=True):  # one gate per block
        x = _AUDIO_UNIT[position](x, g, blk)
    return net.head(x.mean(-1))


@pytest.mark.parametrize("attn", ["se", "eca", "cbam"])
def test_a_users_1d_net(audio_net, attn):
    """Identity-initialised blocks give the base outputs; with their default (random) weights, what the same modules
    give where the position puts them in the forward written out by hand."""
    torch.manual_seed(0)
    base = attnsurgeon.load_model(audio_net).model.eval()
    with torch.no_grad():  # non-trivial BN statistics, so that the BNs around the sites matter
        for m in base.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 1, 4000)
    with torch.no_grad():
        expected = base(x)
    options = {"reduction": 4} if attn != "eca" else {}
    for position in ("standard", "pre", "post", "identity", "3x3"):
        model, report = attnsurgeon.insert(base, attn, position, init="identity", input_size="1,4000", **options)
        assert [(i.block, i.layout, i.channels) for i in report.insertions] == [
            ("layer1.0", "NCL", 32),
            ("layer1.1", "NCL", 32),
        ]
        with torch.no_grad():
            assert torch.equal(model.eval()(x), expected), position
        model, _ = attnsurgeon.insert(base, attn, position, input_size="1,4000", **options)
        gates = [model.get_submodule(i.module) for i in report.insertions]
        with torch.no_grad():
            got = model.eval()(x)
            torch.testing.assert_close(got, _audio_by_hand(base, x, position, gates), rtol=0, atol=1e-5, msg=position)
            assert (got - expected).abs().max() > 1e-3, position  # the gates change the outputs
    if attn == "cbam":  # the spatial gate is a k-tap 1-D conv: 2k weights + BN
        assert report.params["delta"] == 2 * (2 * 32 * 8 + 2 * 7 + 2)  # hidden 32/4


def test_a_1d_net_needs_its_input_size(audio_net, cli):
    with pytest.raises(AttnSurgeonError, match="does not say what input it takes: give --input-size"):
        attnsurgeon.insert(audio_net, "se")
    code, out, err = cli("insert", audio_net, "--attn", "eca", "--input-size", "1,4000", "--json")
    assert code == 0, err
    assert json.loads(out)["input_size"] == [1, 4000]
    code, _, err = cli("insert", audio_net, "--attn", "eca")
    assert code == 2 and "--input-size" in err and "Traceback" not in err
    code, _, err = cli("profile", audio_net, "--input-size", "1,4000", "--channels-last")
    assert code == 2 and "--channels-last needs a 2-D or 3-D input" in err
