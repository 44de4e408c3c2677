"""yolo:, hf: and smp: model sources: names, sample inputs, the missing-extra error, insertion with
exact identity init, the model's own class and training step, profiles against the library's own
summary."""

import json
import os
import sys

import pytest
import torch

from attnsurgeon import AttnSurgeonError, insert, load_model
from attnsurgeon.loading.models import list_models, parse_model_spec
from attnsurgeon.loading.samples import flatten_outputs, max_abs_diff

ultralytics = pytest.importorskip("ultralytics")
transformers = pytest.importorskip("transformers")
smp = pytest.importorskip("segmentation_models_pytorch")

TINY_VIT = dict(
    num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, image_size=32, patch_size=8
)
TINY_RESNET = dict(depths=[1, 1, 1, 1], hidden_sizes=[32, 64, 128, 256], embedding_size=16, num_labels=3)
TINY_CONVNEXT = dict(
    depths=[1, 1, 2, 1], hidden_sizes=[16, 32, 64, 128], num_labels=3, layer_scale_init_value=1.0
)  # the default 1e-6 leaves ECA gates within float rounding of 1


def _perturbed_changes(model, report, x):
    """How much the inserted blocks change their own input once their weights are moved off the
    identity init, relative to that input: each block runs in the forward and acts."""
    changes = []

    def hook(module, args, output):
        changes.append(float((output - args[0]).abs().max() / args[0].abs().max()))  # relative: YOLO's
        # randomly initialised activations are ~1e-8 by model.9

    handles = [model.get_submodule(i.module).register_forward_hook(hook) for i in report.insertions]
    with torch.no_grad():
        for i in report.insertions:
            for p in model.get_submodule(i.module).parameters():
                p.add_(torch.randn_like(p) * 0.5)
        model(x)
    for h in handles:
        h.remove()
    assert len(changes) == len(report.insertions)  # every block ran once
    return min(changes)


# --------------------------------------------------------------------------- names


def test_prefixes_resolve_and_list():
    assert parse_model_spec("yolo:yolov8n") == ("ultralytics", "yolov8n")
    assert parse_model_spec("hf:microsoft/resnet-50") == ("huggingface", "microsoft/resnet-50")
    assert parse_model_spec("smp:Unet:resnet34") == ("smp", "Unet:resnet34")
    names = (
        {n for n, _ in list_models("yolo:yolov8n")}
        | {n for n, _ in list_models("hf:convnext")}
        | {n for n, _ in list_models("smp:unet:resnet34")}
    )
    assert {"yolo:yolov8n", "hf:convnext", "smp:Unet:resnet34"} <= names
    # every scale ultralytics' own yolov8.yaml declares is listed
    from pathlib import Path

    import yaml

    cfg = yaml.safe_load((Path(ultralytics.__file__).parent / "cfg/models/v8/yolov8.yaml").read_text())
    assert {f"yolo:yolov8{s}" for s in cfg["scales"]} <= {n for n, _ in list_models("yolo:yolov8?")}


@pytest.mark.parametrize(
    "spec,message",
    [("yolo:yolov8q", "yolov8"), ("hf:convnxt", "convnext"), ("smp:Unett", "Unet"), ("smp:Unet:resnet35", "resnet34")],
)
def test_unknown_names_suggest(spec, message):
    with pytest.raises(AttnSurgeonError, match=message):
        load_model(spec)


def test_sample_inputs_come_from_the_library_config():
    assert load_model("hf:vit", **TINY_VIT).input_size == (3, 32, 32)
    assert load_model("hf:convnext", num_channels=4, image_size=96, **TINY_CONVNEXT).input_size == (4, 96, 96)
    unet = load_model("smp:Unet:resnet18")
    assert unet.input_size[1] % unet.model.encoder.output_stride == 0
    from ultralytics.utils import DEFAULT_CFG

    assert load_model("yolo:yolov8n").input_size == (3, DEFAULT_CFG.imgsz, DEFAULT_CFG.imgsz)


@pytest.mark.parametrize(
    "spec,extra,library",
    [
        ("yolo:yolov8n", "yolo", "ultralytics"),
        ("hf:resnet", "hf", "transformers"),
        ("smp:Unet", "smp", "segmentation_models_pytorch"),
    ],
)
def test_missing_library_is_one_line_naming_the_extra(spec, extra, library, monkeypatch):
    from typer.testing import CliRunner

    from attnsurgeon.cli import app

    monkeypatch.setitem(sys.modules, library, None)  # importlib.util.find_spec: not installed
    result = CliRunner().invoke(app, ["insert", spec, "--attn", "se"])
    assert result.exit_code == 2
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and f"pip install 'attnsurgeon[{extra}]'" in lines[0] and "Traceback" not in result.output


# --------------------------------------------------------------------------- YOLO


def test_yolo_models_build_without_ultralytics_chatter():
    """ultralytics logs a summary on stdout when it builds a classifier, even with verbose=False: that printed
    a line before the object of ``insert yolo:yolo11n-cls --json`` (issue 29). Built quietly, by default too."""
    import logging

    from ultralytics.utils import LOGGER

    from attnsurgeon.loading.sources.yolo import to_yolo

    level, seen = LOGGER.level, []
    handler = logging.Handler()
    handler.emit = seen.append
    LOGGER.addHandler(handler)
    try:
        model = load_model("yolo:yolo11n-cls").model
        to_yolo(model)
    finally:
        LOGGER.removeHandler(handler)
    assert [r.getMessage() for r in seen] == []
    assert LOGGER.level == level  # put back: ultralytics' own predict and train log as they do


@pytest.mark.slow
def test_insert_json_of_a_yolo_classifier_is_one_object_on_stdout():
    import subprocess

    out = subprocess.run(
        [sys.executable, "-m", "attnsurgeon.cli", "insert", "yolo:yolov8n-cls", "--attn", "se", "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "YOLO_OFFLINE": "1"},
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["model"] == "yolo:yolov8n-cls"


@pytest.mark.slow
def test_yolo_cbam_after_sppf_and_se_in_every_c2f_bottleneck():
    from ultralytics.nn.modules.block import Bottleneck, C2f

    loaded = load_model("yolo:yolov8n")
    size = (3, 128, 128)
    x = torch.randn(1, *size)
    base = loaded.model.eval()
    out, report = insert(loaded, "cbam", after="model.9", init="identity", input_size=size)
    assert type(out) is type(base) and [i.module for i in report.insertions] == ["model.9.cbam_after"]
    out.eval()
    assert max_abs_diff(out(x), base(x)) == 0.0
    assert _perturbed_changes(out, report, x) > 1e-4

    loaded = load_model("yolo:yolov8n")
    base = loaded.model.eval()
    out, report = insert(loaded, "se", init="identity", input_size=size)
    bottlenecks = sorted(
        f"{c}.{n}"
        for c, m in base.named_modules()
        if isinstance(m, C2f)
        for n, b in m.named_modules()
        if isinstance(b, Bottleneck)
    )
    assert sorted(i.block for i in report.insertions) == bottlenecks
    out.eval()
    assert max_abs_diff(out(x), base(x)) == 0.0


@pytest.mark.slow
def test_yolo_profile_base_matches_ultralytics_summary():
    from ultralytics.utils.torch_utils import get_flops, get_num_params

    from attnsurgeon import profile

    loaded = load_model("yolo:yolov8n")
    result = profile(loaded, "eca", input_size=(3, 640, 640), min_run_time=0.05, max_run_time=0.2)
    assert result.base.params == get_num_params(loaded.model)
    gflops = get_flops(loaded.model, imgsz=640)  # ultralytics' own count (2 × MACs)
    assert gflops > 0 and abs(2 * result.base.macs / 1e9 - gflops) / gflops < 0.03
    assert result.modified.params > result.base.params and result.modified.macs > result.base.macs


def _eca_kernel(channels, gamma=2, beta=1):
    """ECA-Net's adaptive kernel size (Wang et al. 2020, eq. 12): the odd number nearest |log2(C) + b| / gamma,
    at least 3."""
    import math

    t = int(abs(math.log2(channels) + beta) / gamma)
    return max(t if t % 2 else t + 1, 3)


@pytest.mark.slow  # a YOLO model built and timed: 3-6 s, kept out of the fast subset's two minutes
def test_cli_profile_yolo_with_eca(cli):
    from ultralytics.nn.modules.block import Bottleneck
    from ultralytics.utils.torch_utils import get_flops, get_num_params

    code, out, err = cli(
        "profile",
        "yolo:yolov8n",
        "--attn",
        "eca",
        "--input-size",
        "64",
        "--min-time",
        "0.05",
        "--max-time",
        "0.1",
        "--json",
    )
    assert code == 0, err
    data = json.loads(out)
    base = load_model("yolo:yolov8n").model
    assert data["model"] == "yolo:yolov8n" and data["input_size"] == [3, 64, 64]
    assert data["base"]["params"] == get_num_params(base)
    gflops = get_flops(base, imgsz=64)  # ultralytics' own count at 64 px
    assert abs(data["base"]["flops"] / 1e9 - gflops) / gflops < 0.03
    # one ECA per C2f bottleneck, a 1-D conv of the paper's kernel size over that bottleneck's channels
    convs = {
        f"{n}.eca": _eca_kernel(m.cv2.conv.out_channels) for n, m in base.named_modules() if isinstance(m, Bottleneck)
    }
    assert {i["module"]: i["params"] for i in data["insertions"]} == convs
    assert data["modified"]["params"] - data["base"]["params"] == sum(convs.values())
    assert data["base"]["latency_ms"]["median"] > 0 and data["modified"]["latency_ms"]["median"] > 0


# --------------------------------------------------------------------------- Hugging Face


@pytest.mark.parametrize(
    "spec,attn,config",
    [
        ("hf:resnet", "se", TINY_RESNET),
        ("hf:convnext", "eca", TINY_CONVNEXT),
        ("hf:vit", "se", dict(TINY_VIT, num_labels=3)),
    ],
)
def test_hf_insert_keeps_class_identity_exact_and_trains_with_labels(spec, attn, config):
    loaded = load_model(spec, **config)
    base = loaded.model.eval()
    size = loaded.input_size if spec == "hf:vit" else (3, 64, 64)
    out, report = insert(loaded, attn, init="identity", input_size=size)
    assert type(out) is type(base) and report.insertions
    x = torch.randn(2, *size)
    out.eval()
    assert type(out(x)) is type(base(x))
    assert max_abs_diff(out(x), base(x)) == 0.0
    out.train()
    result = out(pixel_values=x, labels=torch.tensor([0, 2]))
    assert result.loss is not None and torch.isfinite(result.loss)
    result.loss.backward()
    inserted = {i.module for i in report.insertions}
    grads = {name.rsplit(".", 2)[0] for name, p in out.named_parameters() if p.grad is not None}
    assert any(g.startswith(m) for m in inserted for g in grads)
    out.eval()
    assert _perturbed_changes(out, report, x) > 1e-4


# --------------------------------------------------------------------------- smp


def test_smp_scse_after_decoder_conv2_identity_and_train_step():
    loaded = load_model("smp:Unet:resnet34")
    base = loaded.model.eval()
    size = (3, 64, 64)
    out, report = insert(loaded, "scse", after="decoder.blocks.*.conv2", init="identity", input_size=size)
    assert len(report.insertions) == len(base.decoder.blocks)
    x = torch.randn(2, *size)
    out.eval()
    assert max_abs_diff(out(x), base(x)) == 0.0
    out.train()
    loss = flatten_outputs(out(x))[0].mean()
    loss.backward()
    assert all(p.grad is not None for n, p in out.named_parameters() if "scse" in n)


# --------------------------------------------------------------------------- back out


@pytest.mark.slow
@pytest.mark.parametrize(
    "spec,config,attn,where",
    [
        ("hf:resnet", TINY_RESNET, "se", {}),
        ("smp:Unet:resnet18", {}, "scse", {"after": "decoder.blocks.*.conv2"}),
        ("yolo:yolov8n", {}, "se", {}),
    ],
)
def test_safetensors_and_recipe_rebuild_with_load(spec, config, attn, where, tmp_path):
    from attnsurgeon import export, load

    loaded = load_model(spec, **config)
    out, report = insert(loaded, attn, input_size=(3, 64, 64), **where)
    path = tmp_path / "m.safetensors"
    export(out, path)
    again = load(path)
    if spec.startswith(("hf:", "yolo:")):  # traced in parts: the library's class; smp traces whole
        assert type(again) is type(loaded.model)
    x = torch.randn(1, 3, 64, 64)
    out.eval(), again.eval()
    assert max_abs_diff(again(x), out(x)) == 0.0
    assert {n for n, _ in again.named_parameters()} == {n for n, _ in out.named_parameters()}


# --------------------------------------------------------------------------- --pretrained offline


@pytest.fixture
def silent_host(tmp_path, monkeypatch):
    """Every weight host is a local listener that never answers (its one-place queue is full: the kernel drops
    further connection requests, as a firewall does), the caches are empty, the hub client is not told it is
    offline, and ATTNSURGEON_NETWORK_TIMEOUT is 0.3 s. Yields the host's URL."""
    import socket

    import huggingface_hub.constants
    import ultralytics.utils

    with socket.socket() as server, socket.socket() as queued:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        url = f"http://127.0.0.1:{server.getsockname()[1]}"
        queued.connect(server.getsockname())  # fills the queue; nobody accepts
        monkeypatch.setenv("ATTNSURGEON_NETWORK_TIMEOUT", "0.3")
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_ENDPOINT", url)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
        monkeypatch.setattr(ultralytics.utils, "ASSETS_URL", f"{url}/assets")
        monkeypatch.setattr(ultralytics.utils, "SETTINGS", {**ultralytics.utils.SETTINGS, "weights_dir": str(tmp_path)})
        monkeypatch.chdir(tmp_path)
        yield url


@pytest.mark.parametrize(
    "spec,where,warm",
    [
        ("yolo:yolov8n", "/assets/yolov8n.pt", "yolo:yolov8n"),
        ("hf:microsoft/resnet-50", "/microsoft/resnet-50", "hf:resnet"),
        ("smp:Unet:resnet18", "/smp-hub/resnet18.imagenet", "smp:Unet:resnet18"),
    ],
)
def test_pretrained_fails_in_seconds_with_one_line_when_the_host_never_answers(spec, where, warm, silent_host, cli):
    import time

    load_model(warm)  # the library's imports done: the clock below times the check
    start = time.monotonic()
    code, out, err = cli("insert", spec, "--attn", "se", "--pretrained", "--input-size", "64")
    elapsed = time.monotonic() - start
    assert code == 2 and elapsed < 5, (code, elapsed)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "127.0.0.1 cannot be reached (timed out)" in lines[0] and f"{silent_host}{where}" in lines[0]
    assert out == ""


@pytest.mark.parametrize("spec", ["hf:microsoft/resnet-50", "smp:Unet:resnet18"])
def test_pretrained_with_the_hub_offline_names_the_setting(spec, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(AttnSurgeonError, match=r"not in the local Hugging Face cache and HF_HUB_OFFLINE is set"):
        load_model(spec, pretrained=True)


# --------------------------------------------------------------------------- Hugging Face offline (issue 29)

TINY_RESNET_SMALL = dict(depths=[1, 1], hidden_sizes=[8, 16], embedding_size=8, num_labels=3)


@pytest.mark.parametrize("extra", [[], ["--weights", "w.safetensors"]])
def test_a_hub_id_whose_config_is_not_cached_says_the_config_is_missing_and_the_ways_offline(extra, silent_host, cli):
    """Without --pretrained the config is what is missing, not 'pretrained weights', and --weights FILE is no
    way out."""
    if extra:
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(1)}, "w.safetensors")
    code, out, err = cli("insert", "hf:microsoft/resnet-50", "--attn", "se", *extra)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and out == "", err
    assert "the config of hf:microsoft/resnet-50 is not in the local cache" in lines[0]
    assert "pretrained weights" not in lines[0]
    assert all(
        way in lines[0] for way in ("hf:resnet", "hf:./", "attnsurgeon list models 'hf:*'", "--weights FILE does not")
    )


def test_a_local_folder_with_its_config_builds_offline_and_pretrained_reads_its_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    saved = transformers.ResNetForImageClassification(transformers.ResNetConfig(**TINY_RESNET_SMALL))
    saved.config.save_pretrained(tmp_path / "config-only")
    loaded = load_model("hf:./config-only")
    assert type(loaded.model).__name__ == "ResNetForImageClassification" and loaded.model.config.num_labels == 3
    assert load_model("hf:./config-only", num_labels=5).model.config.num_labels == 5  # kwargs set config fields
    out, report = insert(loaded, "se", input_size=(3, 32, 32))
    assert isinstance(out, transformers.ResNetForImageClassification) and report.insertions
    assert loaded.name == str(tmp_path / "config-only")  # recorded absolute: a saved recipe rebuilds from anywhere

    saved.save_pretrained(tmp_path / "with-weights")
    again = load_model(f"hf:{tmp_path / 'with-weights'}", pretrained=True).model
    assert all(torch.equal(v, saved.state_dict()[k]) for k, v in again.state_dict().items())
    with pytest.raises(
        AttnSurgeonError, match=r"^hf:\./config-only --pretrained: the folder has a config.json but no weights"
    ):
        load_model("hf:./config-only", pretrained=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AttnSurgeonError, match=r"^hf:\./empty: the folder has no config.json"):
        load_model("hf:./empty")
    with pytest.raises(AttnSurgeonError, match=r"^hf:\./missing: no such folder"):
        load_model("hf:./missing")


def test_a_cached_hub_id_builds_offline_and_is_listed(tmp_path, monkeypatch):
    """A hub id whose config.json is in the local Hugging Face cache (laid out as the hub client writes it)."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny-resnet" / "snapshots" / "abc123"
    transformers.ResNetConfig(**TINY_RESNET_SMALL).save_pretrained(snapshot)
    (cache / "models--someone--tiny-resnet" / "refs").mkdir()
    (cache / "models--someone--tiny-resnet" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    model = load_model("hf:someone/tiny-resnet").model
    assert type(model).__name__ == "ResNetForImageClassification" and model.config.hidden_sizes == [8, 16]
    assert ("hf:someone/tiny-resnet", "huggingface") in list_models("hf:*")


def test_the_smp_result_is_a_graph_module_whose_parts_keep_smps_names_as_the_docs_say():
    """docs/sources.md says why an smp result is not smp's class (issue 29, item 4) and what a user does
    instead: the encoder's and decoder's parameters under smp's own names, smp's state dict loading into it with
    only the blocks' keys missing, predict as eval + inference_mode."""
    loaded = load_model("smp:Unet:resnet18")
    base = loaded.model
    out, report = insert(loaded, "scse", after="decoder.blocks.*.conv2", input_size=(3, 64, 64))
    assert (
        not isinstance(out, smp.Unet) and type(out).__name__ == "Unet"
    )  # as documented; update the docs if it changes
    for part in ("encoder", "decoder", "segmentation_head"):
        assert [n for n, _ in base.get_submodule(part).named_parameters()] == [
            n for n, _ in out.get_submodule(part).named_parameters() if "_scse" not in n
        ]
    blocks = {i.module for i in report.insertions}
    result = out.load_state_dict(base.state_dict(), strict=False)
    assert not result.unexpected_keys and {k.rsplit(".", 2)[0] for k in result.missing_keys} == blocks
    out.eval(), base.eval()
    with torch.inference_mode():
        assert out(torch.randn(1, 3, 64, 64)).shape == base.predict(torch.randn(1, 3, 64, 64)).shape
