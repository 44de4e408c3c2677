"""Segmentation, detection and optical flow: no downloads, dict outputs, surgery on the parts that trace.

Every test here runs with torch.hub's downloader replaced by one that fails: building any of
these models must not fetch a backbone's weights that nobody asked for.
"""

import importlib
import os
from dataclasses import replace

import pytest
import torch

import attnsurgeon
from attnsurgeon import load_model
from attnsurgeon.core.errors import AttnSurgeonError
from attnsurgeon.loading.samples import flatten_outputs, max_abs_diff, sample_args
from attnsurgeon.rewriting.surgery import count_params
from attnsurgeon.saving.export import export
from attnsurgeon.saving.saved import load, read_saved

from formulas import se_params
from wiring import assert_each_is_read

# Small settings: the transform's working size, few proposals and detections (recorded in the recipe).
_RCNN = dict(
    min_size=128, max_size=128, rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20, box_detections_per_img=10
)
_DENSE = dict(min_size=128, max_size=128, topk_candidates=20, detections_per_img=10)
DETECTORS = {
    "fasterrcnn_mobilenet_v3_large_320_fpn": dict(num_classes=3, **_RCNN),
    "retinanet_resnet50_fpn": dict(num_classes=3, **_DENSE),
    "fcos_resnet50_fpn": dict(num_classes=3, **_DENSE),
    "ssdlite320_mobilenet_v3_large": dict(num_classes=3, topk_candidates=20, detections_per_img=10),
    "maskrcnn_resnet50_fpn": dict(num_classes=3, **_RCNN),
    "keypointrcnn_resnet50_fpn": dict(num_classes=2, num_keypoints=3, **_RCNN),
}
SEGMENTERS = ["fcn_resnet50", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large"]
SIZE = (3, 128, 128)


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """Any attempt to fetch weights fails the test."""
    import torch.hub
    import torchvision.models._api as tv_api

    calls = []

    def refuse(url, *args, **kwargs):
        calls.append(url)
        raise AssertionError(f"a download was attempted: {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)  # the one place torch.hub downloads
    monkeypatch.setattr(tv_api, "load_state_dict_from_url", refuse)  # torchvision asks for any weights at all
    yield calls
    assert not calls


# --------------------------------------------------------------------------- building


@pytest.mark.parametrize("name", [*SEGMENTERS, *DETECTORS, "raft_small"])
def test_building_downloads_nothing(name, no_downloads):
    loaded = load_model(name)
    assert loaded.weights is None and count_params(loaded.model) > 0
    assert not no_downloads


def test_pretrained_detector_comes_from_the_cache_with_its_backbone(tmp_path, monkeypatch):
    """--pretrained asks for the whole model's weights (backbone included): read from the cache, no download."""
    import torchvision

    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        name = "fasterrcnn_mobilenet_v3_large_320_fpn"
        url = torchvision.models.get_model_weights(name).DEFAULT.url
        torch.manual_seed(5)
        state = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=91).state_dict()
        (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
        torch.save(state, tmp_path / "hub" / "checkpoints" / os.path.basename(url))
        import torchvision.models._api as tv_api

        # torch.hub's own loader reads the cache; its downloader still refuses (the autouse fixture)
        monkeypatch.setattr(tv_api, "load_state_dict_from_url", torch.hub.load_state_dict_from_url)
        loaded = load_model(name, pretrained=True)
        body = "backbone.body.0.0.weight"
        assert torch.equal(loaded.model.state_dict()[body], state[body])
    finally:
        torch.hub.set_dir(os.path.join(os.environ["TORCH_HOME"], "hub"))


def test_pretrained_detector_offline_is_a_clear_error(offline_hub):
    with pytest.raises(
        AttnSurgeonError,
        match=f"127.0.0.1 cannot be reached .*local cache .*{offline_hub}/retinanet_resnet50_fpn.*--weights FILE",
    ):
        load_model("retinanet_resnet50_fpn", pretrained=True)


# --------------------------------------------------------------------------- outputs of any structure


def test_flatten_outputs_and_sample_args():

    a, b = torch.ones(2), torch.zeros(3)
    assert [t.shape for t in flatten_outputs({"out": a, "aux": [b, (a,)], "n": 3})] == [(2,), (3,), (2,)]
    assert max_abs_diff({"out": a}, {"out": a + 1}) == 1.0 and max_abs_diff([a], [b]) == float("inf")

    class Detector(torch.nn.Module):  # torchvision's detectors' signature
        def forward(self, images: list[torch.Tensor], targets=None):
            return images

    class Flow(torch.nn.Module):  # RAFT's
        def forward(self, image1, image2, num_flow_updates: int = 12):
            return image1

    (images,) = sample_args(Detector(), (3, 32, 48), 2)
    assert isinstance(images, list) and [tuple(i.shape) for i in images] == [(3, 32, 48)] * 2
    assert [tuple(t.shape) for t in sample_args(Flow(), (3, 64, 64), 2)] == [(2, 3, 64, 64)] * 2
    assert [tuple(t.shape) for t in sample_args(torch.nn.Conv1d(1, 1, 1), (1, 16), 3)] == [(3, 1, 16)]


# --------------------------------------------------------------------------- segmentation


@pytest.mark.slow
@pytest.mark.parametrize("name", SEGMENTERS)
def test_segmentation_insert_forward_params(name):
    loaded = load_model(name)
    model, report = attnsurgeon.insert(loaded, attn="se", init="identity", input_size=(3, 64, 64))
    assert report.target is None  # traced whole
    assert report.params["delta"] == sum(se_params(i.channels) for i in report.insertions) > 0
    assert report.params["delta"] == count_params(model) - count_params(loaded.model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        base = loaded.model.eval()(x)
    modified = assert_each_is_read(model.eval(), [i.module for i in report.insertions], lambda: model(x))
    assert list(modified) == list(base) and all(modified[k].shape == base[k].shape == (1, 21, 64, 64) for k in base)
    assert max_abs_diff(modified, base) == 0.0  # identity init: the same outputs, every one of them


class TwoHeads(torch.nn.Module):
    """A segmentation-style model in miniature: residual blocks, then a dict of two outputs."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.blocks = torch.nn.Sequential(*[Residual() for _ in range(2)])
        self.out, self.aux = torch.nn.Conv2d(16, 4, 1), torch.nn.Conv2d(16, 2, 1)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return {"out": self.out(x), "aux": self.aux(x)}


class Residual(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn, self.conv2 = (
            torch.nn.Conv2d(16, 16, 3, padding=1),
            torch.nn.BatchNorm2d(16),
            torch.nn.Conv2d(16, 16, 3, padding=1),
        )

    def forward(self, x):
        return torch.relu(x + self.conv2(torch.relu(self.bn(self.conv1(x)))))


@pytest.mark.slow
def test_dict_outputs_profile_in_train_mode_and_every_export_format(tmp_path):
    """MACs, a training step (its loss from every output) and all four formats compare every output tensor."""
    from fvcore.nn import FlopCountAnalysis

    torch.manual_seed(0)
    net = TwoHeads()
    result = attnsurgeon.profile(
        net, attn="se", reduction=4, input_size=(3, 16, 16), mode="train", min_run_time=0.01, max_run_time=0.02
    )
    d = result.to_dict()
    stock = FlopCountAnalysis(net.eval(), (torch.randn(1, 3, 16, 16),)).unsupported_ops_warnings(False).total()
    assert d["fvcore_default_macs"]["base"] == stock > 0
    assert d["delta"]["macs"] == sum(i["macs"] for i in d["insertions"]) > 0
    assert d["modified"]["latency_ms"]["median"] > 0 and d["modified"]["peak_memory_bytes"] > 0
    assert all(p.grad is None for p in net.parameters())  # the training step ran, and was cleaned up
    model, _ = attnsurgeon.insert(net, attn="se", reduction=4, input_size=(3, 16, 16))
    for ext in ("pt2", "onnx", "ts"):
        written = export(model, tmp_path / f"m.{ext}")
        assert written.dynamic_batch and written.max_abs_diff <= 1e-4 and (tmp_path / f"m.{ext}").is_file()
    x = torch.randn(2, 3, 16, 16)
    program = torch.export.load(str(tmp_path / "m.pt2")).module()
    assert max_abs_diff(program(x), model.eval()(x)) < 1e-5 and list(program(x)) == ["out", "aux"]


def test_a_wrong_second_output_fails_the_export(tmp_path, monkeypatch):
    export_mod = importlib.import_module("attnsurgeon.saving.export")  # the module: attnsurgeon.export is the function

    model, _ = attnsurgeon.insert(TwoHeads(), attn="se", reduction=4, input_size=(3, 16, 16))
    real = export_mod.FORMATS["ts"]

    def corrupt(tmp, model):  # the reader returns the right 'out' and a wrong 'aux'
        run = real.reader(tmp, model)
        return lambda *args: {"out": run(*args)["out"], "aux": run(*args)["aux"] + 1}

    monkeypatch.setitem(export_mod.FORMATS, "ts", replace(real, reader=corrupt))
    with pytest.raises(AttnSurgeonError, match="does not reproduce the model"):
        export(model, tmp_path / "m.ts")
    assert not (tmp_path / "m.ts").exists()


@pytest.mark.slow
def test_segmentation_safetensors_round_trip(tmp_path):
    loaded = load_model("lraspp_mobilenet_v3_large")
    model, _ = attnsurgeon.insert(loaded, attn="eca", input_size=(3, 64, 64))
    assert export(model, tmp_path / "m.safetensors").max_abs_diff == 0.0
    x = torch.randn(1, 3, 64, 64)
    assert max_abs_diff(load(tmp_path / "m.safetensors")(x), model.eval()(x)) == 0.0


# --------------------------------------------------------------------------- detection


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DETECTORS))
def test_detector_surgery_on_its_backbone(name, tmp_path):
    loaded = load_model(name, **DETECTORS[name])
    base = loaded.model.eval()
    model, report = attnsurgeon.insert(loaded, attn="se", init="identity", input_size=SIZE)
    assert report.target == ["backbone"] and "does not trace whole" in report.notes[0]
    assert type(model) is type(base) and model is not base and base.backbone is not model.backbone
    (images,) = sample_args(base, SIZE, 2)
    assert isinstance(images, list) and len(images) == 2  # a detector's own input: a list of images
    for ins in report.insertions:  # full paths from the top model, and real modules there
        assert ins.block.startswith("backbone.") and ins.module.startswith(ins.block + ".")
        model.get_submodule(ins.module)
    assert report.params["delta"] == sum(se_params(i.channels) for i in report.insertions) > 0
    assert report.params["delta"] == count_params(model) - count_params(base)
    assert not any(".se" in k for k in base.state_dict())  # the base model is left as it was
    args = sample_args(base, SIZE, 1, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = base(*args), model.eval()(*args)
    assert [sorted(d) for d in got] == [sorted(d) for d in expected]
    assert max_abs_diff(got, expected) == 0.0  # identity init: exactly the base model's detections
    # an untrained detector may detect nothing, whatever its backbone does: the backbone's features tell
    x = torch.randn(1, *SIZE)
    with torch.no_grad():
        features = base.backbone(x)
    got = assert_each_is_read(model, [i.module for i in report.insertions], lambda: model.backbone(x))
    assert max_abs_diff(got, features) == 0.0
    # safetensors + recipe: attnsurgeon.load rebuilds the same model (target included)
    written = export(model, tmp_path / "det.safetensors")
    assert written.max_abs_diff == 0.0
    recipe, tensors, _ = read_saved(tmp_path / "det.safetensors")  # export loaded it back and compared every output
    assert recipe.target == ["backbone"] and tensors.keys() == model.state_dict().keys()
    assert recipe.model_kwargs == DETECTORS[name]
    # the other formats are refused before any work, with the reason
    with pytest.raises(AttnSurgeonError, match="list of images .*safetensors"):
        export(model, tmp_path / "det.onnx")
    assert not (tmp_path / "det.onnx").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fasterrcnn_mobilenet_v3_large_320_fpn"])  # one: the path is the same for all
def test_detector_profile(name):
    from fvcore.nn import FlopCountAnalysis

    loaded = load_model(name, **DETECTORS[name])
    with pytest.raises(AttnSurgeonError, match="targets .*--mode inference"):
        attnsurgeon.profile(loaded, attn="se", mode="train")
    result = attnsurgeon.profile(loaded, attn="se", input_size=SIZE, min_run_time=0.02, max_run_time=0.05)
    d = result.to_dict()
    images = sample_args(loaded.model, SIZE, 1, generator=torch.Generator().manual_seed(0))
    # the whole detector: stock fvcore's count (convs, matmuls) is the reference; the element-wise ops come on top
    stock = (
        FlopCountAnalysis(loaded.model.eval(), images).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    )
    assert d["fvcore_default_macs"]["base"] == stock.total() > 0
    assert d["base"]["macs"] > stock.total()
    assert d["delta"]["params"] == sum(i["params"] for i in d["insertions"]) > 0
    assert d["delta"]["macs"] == sum(i["macs"] for i in d["insertions"]) > 0
    assert all(i["module"].startswith("backbone.") for i in d["insertions"])
    for side in ("base", "modified"):
        assert d[side]["latency_ms"]["median"] > 0 and d[side]["peak_memory_bytes"] > 0


@pytest.mark.slow
def test_blocks_globs_match_full_names_and_target_chooses_a_part():
    loaded = load_model("retinanet_resnet50_fpn", **DETECTORS["retinanet_resnet50_fpn"])
    _, report = attnsurgeon.insert(
        loaded, attn="eca", blocks="backbone.body.layer4.*", target="backbone.body", input_size=SIZE
    )
    assert report.target == ["backbone.body"]
    assert [i.block for i in report.insertions] == [f"backbone.body.layer4.{k}" for k in range(3)]
    _, anatomy = attnsurgeon.inspect_model(loaded, input_size=SIZE)
    assert anatomy.target == ["backbone"]
    assert anatomy.input_size == (3, 128, 128)  # what the backbone sees after the detector's own resize
    assert anatomy.blocks[0].name == "backbone.body.layer1.0"


@pytest.mark.slow
def test_target_errors_name_what_traces():
    loaded = load_model("fasterrcnn_mobilenet_v3_large_320_fpn", **DETECTORS["fasterrcnn_mobilenet_v3_large_320_fpn"])
    with pytest.raises(
        AttnSurgeonError,
        match=r"no submodule of that name\. Did you mean: backbone\.body.*"
        r"Submodules that trace and hold blocks: backbone",
    ):
        attnsurgeon.insert(loaded, attn="se", target="backbone.bodi", input_size=SIZE)
    with pytest.raises(AttnSurgeonError, match="'rpn' is called with something other than one tensor.*: backbone"):
        attnsurgeon.insert(loaded, attn="se", target="rpn", input_size=SIZE)
    with pytest.raises(AttnSurgeonError, match="'roi_heads.box_head' traces but offers no place for a block"):
        attnsurgeon.insert(loaded, attn="se", target="roi_heads.box_head", input_size=SIZE)


@pytest.mark.slow
def test_target_on_a_model_that_traces_whole_round_trips(tmp_path):
    model, report = attnsurgeon.insert("resnet18", attn="se", target="layer3", input_size=64)
    assert report.target == ["layer3"] and [i.block for i in report.insertions] == ["layer3.0", "layer3.1"]
    assert isinstance(model.layer3, torch.fx.GraphModule) and not isinstance(model, torch.fx.GraphModule)
    export(model, tmp_path / "r.safetensors")
    recipe, _, _ = read_saved(tmp_path / "r.safetensors")
    assert recipe.target == ["layer3"]
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(load(tmp_path / "r.safetensors")(x), model.eval()(x))


def test_recipe_target_is_validated():
    from attnsurgeon.planning.recipes import parse_recipe

    assert parse_recipe({"model": "m", "target": "backbone.body", "insertions": []}).target == ["backbone.body"]
    with pytest.raises(AttnSurgeonError, match="target: expected a module path"):
        parse_recipe({"model": "m", "target": 3, "insertions": []})


# --------------------------------------------------------------------------- optical flow


def test_raft_small_through_its_feature_encoders():
    loaded = load_model("raft_small")
    model, report = attnsurgeon.insert(loaded, attn="se", init="identity", input_size=SIZE)
    assert report.target == ["feature_encoder", "context_encoder"]
    assert {i.block.split(".")[0] for i in report.insertions} == {"feature_encoder", "context_encoder"}
    frames = sample_args(loaded.model, SIZE, 1, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = loaded.model.eval()(*frames, num_flow_updates=2)
    flows = assert_each_is_read(
        model.eval(), [i.module for i in report.insertions], lambda: model(*frames, num_flow_updates=2)
    )
    assert [f.shape for f in flows] == [(1, 2, 128, 128)] * 2
    assert max_abs_diff(flows, expected) == 0.0


# --------------------------------------------------------------------------- CLI


@pytest.mark.slow
def test_cli_detector_insert_inspect_and_errors(cli, tmp_path):
    import json

    code, out, err = cli(
        "insert", "ssdlite320_mobilenet_v3_large", "--attn", "eca", "--target", "backbone.features.1", "--json"
    )
    assert code == 0, err
    data = json.loads(out)
    assert data["target"] == ["backbone.features.1"]
    assert {i["block"].rsplit(".", 1)[0] for i in data["insertions"]} == {"backbone.features.1"}
    code, out, _ = cli("inspect", "ssdlite320_mobilenet_v3_large")
    assert code == 0 and "traced: backbone (input 3×320×320)" in out and "backbone.features.0.1" in out
    code, out, _ = cli("inspect", "ssdlite320_mobilenet_v3_large", "--input-size", "3,256,256")
    assert code == 0 and "input 3×256×256 · traced: backbone" in out  # the size given, not the model's default
    code, _, err = cli("insert", "ssdlite320_mobilenet_v3_large", "--attn", "se", "--target", "backbone.features")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert (
        "error: --target 'backbone.features' is not called when the model runs" in err
        and "hold blocks: backbone" in err
    )
    code, _, err = cli("insert", "ssdlite320_mobilenet_v3_large", "--out", tmp_path / "d.pt2")
    assert code == 2 and "cannot capture" in err and not (tmp_path / "d.pt2").exists()


@pytest.mark.slow
def test_profile_counts_the_traced_parts_where_fvcore_cannot_run_the_whole(monkeypatch):
    """Where fvcore fails on the whole model, MACs come from the traced parts, and the report says so."""
    import attnsurgeon.profiling.flops as flops

    real = flops.count_macs

    def whole_fails(model, example):
        if isinstance(example, tuple) and len(example) == 2:  # RAFT's two frames: the whole model
            raise RuntimeError("cannot trace this")
        return real(model, example)

    monkeypatch.setattr(flops, "count_macs", whole_fails)
    loaded = load_model("raft_small")
    result = attnsurgeon.profile(loaded, attn="se", input_size=SIZE, min_run_time=0.01, max_run_time=0.02)
    d = result.to_dict()
    assert any(
        "MACs count feature_encoder, context_encoder only: fvcore cannot run the whole RAFT (cannot trace this)" in w
        for w in d["warnings"]
    )
    # the reference is stock fvcore on the two parts, called here: the feature encoder sees both frames, the context
    # encoder the first; the element-wise ops come on top
    from fvcore.nn import FlopCountAnalysis

    frames = torch.randn(2, *SIZE)
    stock = sum(
        FlopCountAnalysis(part.eval(), (x,)).unsupported_ops_warnings(False).uncalled_modules_warnings(False).total()
        for part, x in ((loaded.model.feature_encoder, frames), (loaded.model.context_encoder, frames[:1]))
    )
    assert d["fvcore_default_macs"]["base"] == stock > 0
    assert d["base"]["macs"] > stock
    assert d["delta"]["macs"] == sum(i["macs"] for i in d["insertions"]) > 0


def test_frozen_batch_norm_is_a_norm_like_batch_norm():
    """Pretrained detectors' backbones use FrozenBatchNorm2d: their sites are those of the BatchNorm2d model."""
    import torchvision
    from torchvision.ops.misc import FrozenBatchNorm2d

    def producers(model):
        gm, report = attnsurgeon.insert(model, attn="se", position="3x3", blocks="layer1.*", input_size=64)
        nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
        return [nodes[i.module].args[0].target for i in report.insertions]

    plain = producers(torchvision.models.resnet18())
    assert plain == ["layer1.0.relu", "layer1.1.relu"]  # after conv1, bn1 and relu
    assert producers(torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d)) == plain
