"""attnsurgeon explain: Grad-CAM (pytorch-grad-cam) of base and modified models, gate values and statistics."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from attnsurgeon import AttnSurgeonError
from attnsurgeon.pictures.explain import explain
from attnsurgeon.pictures.gates import HIGH, LOW
from attnsurgeon.pictures.sheet import write_explanation

RED = (8, 40, 24, 56)  # rows 8..23, columns 40..55: a red square in the top right
BLUE = (40, 8, 56, 24)  # rows 40..55, columns 8..23: a blue square in the bottom left


def _image(path, size=64, squares=(RED, BLUE), seed=0):
    rng = np.random.default_rng(seed)
    a = (80 + rng.integers(-10, 10, (size, size, 3))).astype(np.uint8)  # grey, a little noise
    for (y0, x0, y1, x1), colour in zip(squares, ([230, 20, 20], [20, 20, 170]), strict=False):  # up to two squares
        a[y0:y1, x0:x1] = colour
    Image.fromarray(a).save(path)
    return path


class Detector(nn.Module):
    """A classifier whose weights make class 2 'red here' and class 0 'blue here': channel 0 of the
    first conv is red minus green and blue, channel 1 blue minus red and green (both negative on
    grey), the second conv passes them on, and the head reads channel 0 for class 2, 1 for class 0."""

    default_input_size = (3, 64, 64)

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.zero_()
            c1, c2 = self.features[0], self.features[2]
            c1.weight[0, :, 1, 1] = torch.tensor([1.0, -1.0, -1.0])
            c1.weight[1, :, 1, 1] = torch.tensor([-1.0, -1.0, 1.0])
            c2.weight[0, 0, 1, 1] = c2.weight[1, 1, 1, 1] = 1.0
            self.fc.weight[2, 0] = self.fc.weight[0, 1] = 10.0

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def _inside(yx, box):
    y0, x0, y1, x1 = box
    return y0 <= yx[0] < y1 and x0 <= yx[1] < x1


@pytest.mark.slow
def test_gradcam_peaks_on_the_stimulus_that_drives_the_class(tmp_path):
    img = _image(tmp_path / "two.png")
    e = explain(Detector(), [img])
    assert e.class_index == [2]  # red is brighter against grey than blue: the top class
    cam = e.base[0].cam
    peak = np.unravel_index(cam.argmax(), cam.shape)
    assert _inside(peak, RED) and cam[BLUE[0] : BLUE[2], BLUE[1] : BLUE[3]].max() < 0.05
    e = explain(Detector(), [img], class_index=0)  # the other class looks at the other square
    cam = e.base[0].cam
    assert (
        _inside(np.unravel_index(cam.argmax(), cam.shape), BLUE) and cam[RED[0] : RED[2], RED[1] : RED[3]].max() < 0.05
    )


@pytest.mark.slow
def test_identity_init_gates_are_exactly_one_and_the_maps_agree(tmp_path):
    img = _image(tmp_path / "two.png")
    e = explain("resnet18", [img], attn="cbam", init="identity", input_size=64)
    data = e.to_dict()
    gates = data["images"][0]["modified"]["gates"]
    assert len(gates) == 2 * 8  # a channel and a spatial gate in each of resnet18's 8 blocks
    for g in gates:
        assert g["mean"] == 1.0 and g["std"] == 0.0 and g["min"] == g["max"] == 1.0 and g["near_1"] == 1.0, g
    assert {g["kind"] for g in gates} == {"channel", "spatial"}
    np.testing.assert_allclose(e.modified[0].cam, e.base[0].cam, atol=1e-6)  # an identity changes nothing


@pytest.mark.slow
def test_gate_statistics_equal_values_read_by_independent_hooks(tmp_path):
    files = [_image(tmp_path / "a.png", seed=1), _image(tmp_path / "b.png", squares=(BLUE, RED), seed=2)]
    torch.manual_seed(0)
    e = explain("resnet18", files, attn="cbam", stages=[3, 4], input_size=64)
    write_explanation(e, tmp_path / "out")
    data = json.loads((tmp_path / "out" / "explain.json").read_text())
    model = e.modified_model
    seen = {}
    handles = [
        model.get_submodule(f"{b}.cbam.{part}.gate").register_forward_hook(
            lambda m, i, o, key=(f"{b}.cbam", part): seen.__setitem__(key, o.detach().numpy().astype(np.float64))
        )
        for b in ("layer3.0", "layer3.1", "layer4.0", "layer4.1")
        for part in ("channel", "spatial")
    ]
    with torch.no_grad():
        model(e.inputs)
    for h in handles:
        h.remove()
    for i, image in enumerate(data["images"]):
        got = {(g["module"], g["gate"]): g for g in image["modified"]["gates"]}
        assert set(got) == set(seen)
        for key, values in seen.items():
            v = values[i]
            expect = {
                "mean": v.mean(),
                "std": v.std(),
                "min": v.min(),
                "max": v.max(),
                "near_0": (v < LOW).mean(),
                "near_1": (v > HIGH).mean(),
            }
            for stat, value in expect.items():
                assert got[key][stat] == pytest.approx(value, rel=1e-6, abs=1e-9), (key, stat)
            assert got[key]["shape"] == list(v.shape)
    assert data["gradcam"]["library"].startswith("pytorch-grad-cam")
    # the summary across the two images: the mean of the per-image means
    row = next(r for r in data["summary"]["modified"] if (r["module"], r["gate"]) == ("layer4.1.cbam", "channel"))
    assert row["mean"] == pytest.approx(
        np.mean([seen[("layer4.1.cbam", "channel")][i].mean() for i in range(2)]), rel=1e-6
    )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "explain.json",
        "sheet_a.png",
        "sheet_b.png",
        "summary.png",
    ]


@pytest.mark.slow
def test_the_models_own_attention_is_read_too(tmp_path):
    """mobilenet_v3_small's SE modules (torchvision's SqueezeExcitation, traced through) are found
    as attention regions; their gate is the Hardsigmoid they call."""
    img = _image(tmp_path / "x.png")
    e = explain("mobilenet_v3_small", [img], input_size=64)
    model = e.base_model
    expected = [
        n
        for n, m in model.named_modules()
        if type(m).__name__ == "Hardsigmoid" and ".block." in n and n.endswith("scale_activation")
    ]
    assert sorted(g.path for g in e.gates) == sorted(expected) and len(expected) == 9
    assert all(g.origin == "existing" and g.kind == "channel" for g in e.gates)
    seen = {}
    handles = [
        model.get_submodule(p).register_forward_hook(lambda m, i, o, p=p: seen.__setitem__(p, o.detach()))
        for p in expected
    ]
    with torch.no_grad():
        model(e.inputs)
    for h in handles:
        h.remove()
    for g in e.gates:
        assert torch.equal(e.base[0].gates[(g.module, g.name)], seen[g.path][0])


@pytest.mark.slow
def test_torchvision_preprocessing_is_the_weights_own(tmp_path):
    from torchvision.models import ResNet18_Weights

    img = _image(tmp_path / "big.png", size=300)
    e = explain("resnet18", [img])
    with Image.open(img) as im:
        expected = ResNet18_Weights.DEFAULT.transforms()(im.convert("RGB"))
    torch.testing.assert_close(e.inputs[0], expected, atol=1e-5, rtol=0)
    assert e.inputs.shape[-2:] == (224, 224)


@pytest.mark.parametrize(
    "make, kwargs, message",
    [
        (lambda d: d / "missing.png", {}, "does not exist"),
        (lambda d: (d / "text.png").write_text("not an image") and d / "text.png", {}, "cannot read image"),
        (lambda d: _image(d / "ok.png"), {"layer": "layer9"}, "--layer 'layer9' is no module"),
        (lambda d: _image(d / "ok.png"), {"layer": "avgpool"}, "has no spatial output"),
        (lambda d: _image(d / "ok.png"), {"class_index": 1000}, "--class 1000 is out of range"),
    ],
)
def test_bad_input_is_one_clear_line_and_leaves_no_output(cli, tmp_path, make, kwargs, message):
    image = make(tmp_path)
    with pytest.raises(AttnSurgeonError, match=message.replace("(", r"\(").replace(")", r"\)")):
        explain("resnet18", [image], input_size=64, **kwargs)
    out = tmp_path / "out"
    flags = {"layer": "--layer", "class_index": "--class"}
    args = [a for k, v in kwargs.items() for a in (flags[k], v)]
    code, stdout, err = cli("explain", "resnet18", "--image", image, "--input-size", "64", "--out", out, *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


@pytest.mark.slow  # a Grad-CAM run: 2-3 s, kept out of the fast subset's two minutes
def test_a_failure_while_writing_leaves_no_partial_folder(tmp_path, monkeypatch):
    import attnsurgeon.pictures.sheet as ex

    files = [_image(tmp_path / "a.png"), _image(tmp_path / "b.png")]
    e = explain(Detector(), files)
    calls = []

    def flaky(e, i):
        calls.append(i)
        if i == 1:
            raise RuntimeError("disk full")
        return real(e, i)

    real = ex.draw_sheet
    monkeypatch.setattr(ex, "draw_sheet", flaky)
    with pytest.raises(RuntimeError):
        write_explanation(e, tmp_path / "out")
    assert calls == [0, 1]  # the first sheet was written, then the run failed...
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))  # ... and nothing is left


@pytest.mark.slow
def test_cli_explain_a_folder(cli, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    _image(folder / "one.png")
    _image(folder / "two.png", squares=(BLUE, RED))
    (folder / "notes.txt").write_text("skipped: not an image extension")
    code, stdout, err = cli(
        "explain",
        "resnet18",
        "--image",
        folder,
        "--attn",
        "se",
        "--stages",
        "4",
        "--input-size",
        "64",
        "--out",
        tmp_path / "out",
        "--json",
    )
    assert code == 0, err
    data = json.loads(stdout)
    assert [im["sheet"] for im in json.loads((tmp_path / "out" / "explain.json").read_text())["images"]] == [
        "sheet_one.png",
        "sheet_two.png",
    ]
    assert len(data["images"]) == 2 and {g["module"] for g in data["gates"]} == {"layer4.0.se", "layer4.1.se"}
    assert (tmp_path / "out" / "summary.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_the_default_layer_is_the_last_map_with_a_spatial_extent(tmp_path):
    """torchvision's ConvNeXt ends in a channels-last 1×1 norm before its head: Grad-CAM goes to
    the last stage's output, whose 2×2 map (at 64 px) has a spatial extent."""
    e = explain("convnext_tiny", [_image(tmp_path / "x.png")], input_size=64)
    assert e.layer == "features.7.2" and e.base[0].cam.shape == (64, 64)


@pytest.mark.slow
def test_an_existing_out_folder_is_kept_unless_force(cli, tmp_path):
    image = _image(tmp_path / "x.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    code, _, err = cli("explain", "resnet18", "--image", image, "--input-size", "64", "--out", out)
    assert code == 2 and "exists; pass --force" in err and (out / "mine.txt").exists()
    code, _, err = cli("explain", "resnet18", "--image", image, "--input-size", "64", "--out", out, "--force")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["explain.json", "sheet_x.png"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_without_grad_cam_explain_says_what_to_install(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "pytorch_grad_cam" else real(name, *a)
    )
    with pytest.raises(AttnSurgeonError, match=r"pip install 'attnsurgeon\[explain\]'"):
        explain("resnet18", [_image(tmp_path / "x.png")], input_size=64)
