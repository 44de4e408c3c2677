"""Starting from the model the user fine-tuned: builder arguments (--model-arg, model_args:), and the
checkpoints training scripts write (timm's train.py, Lightning, DDP) as --weights, read without
running a pickle. The references are the fine-tuned model loaded by hand (timm's own load_checkpoint)."""

import argparse
import json

import pytest
import torch

import attnsurgeon
from attnsurgeon.core.errors import AttnSurgeonError

NUM_CLASSES = 7


def _one_error(code, stderr):
    """A user error: exit status 2 and one message (Rich may wrap it at the test terminal's width), no traceback."""
    return (
        code == 2 and stderr.count("error:") == 1 and stderr.lstrip().startswith("error:") and "Traceback" not in stderr
    )


def _fine_tuned():
    import timm

    torch.manual_seed(0)
    return timm.create_model("resnet18", num_classes=NUM_CLASSES).eval()


def _timm_checkpoint(model, folder):
    """What timm's train.py writes: its own CheckpointSaver, with an EMA whose weights differ from the raw ones."""
    from timm.utils import CheckpointSaver, ModelEmaV3

    ema = ModelEmaV3(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ema.update(model)  # halfway between the start and the raw weights: a third set
    args = argparse.Namespace(model="resnet18", num_classes=NUM_CLASSES, lr=0.1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    saver = CheckpointSaver(
        model, optimizer, args=args, model_ema=ema, checkpoint_dir=str(folder), recovery_dir=str(folder), max_history=1
    )
    saver.save_checkpoint(epoch=0, metric=1.0)
    path = folder / "model_best.pth.tar"
    assert path.is_file()
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    model = _fine_tuned()
    out = {"timm": _timm_checkpoint(model, folder)}  # changes model's weights: the raw ones below are those
    state = {k: v.clone() for k, v in model.state_dict().items()}  # the step below changes the model in place
    torch.save(state, folder / "plain_sd.pth")
    out["plain"] = folder / "plain_sd.pth"
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()  # a real optimizer state in the Lightning checkpoint
    lightning = {
        "epoch": 1,
        "global_step": 10,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": {f"model.{k}": v for k, v in state.items()},
        "optimizer_states": [optimizer.state_dict()],
        "lr_schedulers": [],
        "hyper_parameters": {"lr": 0.1},
    }
    torch.save(lightning, folder / "epoch=1-step=10.ckpt")
    out["lightning"] = folder / "epoch=1-step=10.ckpt"
    torch.save({f"module.{k}": v for k, v in state.items()}, folder / "ddp.pt")
    out["ddp"] = folder / "ddp.pt"
    out["raw"] = {k: v.clone() for k, v in state.items()}
    return out


def _by_hand(kind, files):
    """The fine-tuned model as its user would load it: timm's load_checkpoint (EMA first), or the raw state dict."""
    import timm
    from timm.models import load_checkpoint

    model = timm.create_model("resnet18", num_classes=NUM_CLASSES)
    if kind == "timm":
        load_checkpoint(model, str(files["timm"]), use_ema=True)
    else:
        model.load_state_dict(files["raw"])
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["plain", "timm", "lightning", "ddp"])
def test_insert_from_a_checkpoint_gives_the_fine_tuned_outputs(kind, files, cli, tmp_path):
    out = tmp_path / "se.safetensors"
    code, stdout, stderr = cli(
        "insert",
        "timm:resnet18",
        "--model-arg",
        f"num_classes={NUM_CLASSES}",
        "--weights",
        files[kind],
        "--attn",
        "se",
        "--init",
        "identity",
        "--input-size",
        "64",
        "--out",
        out,
        "--json",
    )
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["model_kwargs"] == {"num_classes": NUM_CLASSES}
    assert (
        report["weights_key"] == {"plain": None, "timm": "state_dict_ema", "lightning": "state_dict", "ddp": None}[kind]
    )
    if kind == "timm":
        assert any("EMA" in n and "--weights-key state_dict" in n for n in report["notes"])
    if kind in ("lightning", "ddp"):
        assert any(
            f"'{'model.' if kind == 'lightning' else 'module.'}' prefix was taken off" in n for n in report["notes"]
        )
    modified = attnsurgeon.load(out).eval()  # rebuilt from the saved recipe: its builder arguments included
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = _by_hand(kind, files)(x)
        assert expected.shape == (2, NUM_CLASSES)
        torch.testing.assert_close(modified(x), expected, rtol=0, atol=1e-5)


@pytest.mark.slow  # checkpoints written and loaded three times: 2-3 s, kept out of the fast subset's two minutes
def test_the_ema_weights_are_taken_first_and_the_key_chooses_others(files):
    ema = attnsurgeon.load_model("timm:resnet18", num_classes=NUM_CLASSES, weights=files["timm"])
    raw = attnsurgeon.load_model(
        "timm:resnet18", num_classes=NUM_CLASSES, weights=files["timm"], weights_key="state_dict"
    )
    assert ema.weights_key == "state_dict_ema" and raw.weights_key == "state_dict"
    reference = _by_hand("timm", files).state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in ema.model.state_dict().items())
    assert all(torch.equal(v, files["raw"][k]) for k, v in raw.model.state_dict().items())
    assert not torch.equal(ema.model.fc.weight, raw.model.fc.weight)  # the two sets differ: the choice matters
    with pytest.raises(
        AttnSurgeonError, match="no entry 'ema' .*its weights are under '(state_dict|state_dict_ema)', '"
    ):
        attnsurgeon.load_model("timm:resnet18", num_classes=NUM_CLASSES, weights=files["timm"], weights_key="ema")
    with pytest.raises(AttnSurgeonError, match="'args' in .* is not a state dict"):
        attnsurgeon.load_model("timm:resnet18", num_classes=NUM_CLASSES, weights=files["timm"], weights_key="args")


def test_a_classifier_of_another_size_names_the_model_arg(files, cli):
    code, _, stderr = cli("insert", "timm:resnet18", "--weights", files["plain"], "--attn", "se", "--input-size", "64")
    assert _one_error(code, stderr)
    stderr = " ".join(stderr.split())
    assert "classifier has 7 outputs and the model's 1000" in stderr and "--model-arg num_classes=7" in stderr
    # a model that differs elsewhere too gets no such hint: the classes are not the problem there
    with pytest.raises(AttnSurgeonError) as info:
        attnsurgeon.load_model("timm:resnet34", num_classes=3, weights=files["plain"])
    assert "missing keys" in str(info.value) and "--model-arg" not in str(info.value)


class _Payload:
    """Unpickling this would create the marker file: what a malicious checkpoint does with os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_a_checkpoint_holding_other_objects_is_refused_with_nothing_run(files, cli, tmp_path):
    marker, path, out = tmp_path / "ran", tmp_path / "evil.pth.tar", tmp_path / "se.safetensors"
    torch.save({"state_dict": files["raw"], "args": argparse.Namespace(lr=0.1), "hook": _Payload(marker)}, path)
    code, stdout, stderr = cli(
        "insert", "timm:resnet18", "--model-arg", "num_classes=7", "--weights", path, "--attn", "se", "--out", out
    )
    assert _one_error(code, stderr) and stdout == "" and "refused to load" in stderr
    assert not marker.exists() and not out.exists()
    with pytest.raises(
        AttnSurgeonError, match=r"Python objects other than tensors \(([\w.]+, )*builtins.getattr"
    ) as info:
        attnsurgeon.load_model("timm:resnet18", num_classes=NUM_CLASSES, weights=path)
    assert "pathlib.Path" in str(info.value) and "Namespace" not in str(info.value)  # the allowed type is not blamed
    assert "\n" not in str(info.value) and not marker.exists()


def test_model_args_are_yaml_values_and_wrong_ones_fail_in_one_line(cli):
    from attnsurgeon.cli.options import parse_model_args

    assert parse_model_args(
        ["num_classes=7", "drop_rate=0.1", "global_pool=avg", "pretrained_strict=false", "img_size=[64, 64]", "x=null"]
    ) == {
        "num_classes": 7,
        "drop_rate": 0.1,
        "global_pool": "avg",
        "pretrained_strict": False,
        "img_size": [64, 64],
        "x": None,
    }
    for bad, message in [
        ("num_classes", "expected KEY=VALUE"),
        ("weights=a.pt", "use --weights"),
        ("a={b: 1}", "a mapping in a recipe"),
    ]:
        code, _, stderr = cli("insert", "timm:resnet18", "--model-arg", bad)
        assert _one_error(code, stderr) and message in " ".join(stderr.split())
    code, _, stderr = cli("insert", "timm:resnet18", "--model-arg", "num_clases=7", "--input-size", "64")
    assert _one_error(code, stderr) and "num_clases" in stderr


@pytest.mark.slow
def test_a_recipe_builds_with_model_args_and_weights_and_its_saved_recipe_records_them(files, cli, tmp_path):
    recipe, out = tmp_path / "r.yaml", tmp_path / "r.safetensors"
    recipe.write_text(
        f"model: timm:resnet18\nmodel_args: {{num_classes: 7}}\nweights: {files['timm']}\n"
        "weights_key: state_dict\ninput_size: 64\ninsertions: [{attn: eca, init: identity}]\n"
    )
    code, _, stderr = cli("apply", recipe, "--out", out)
    assert code == 0, stderr
    from attnsurgeon.saving.saved import recipe_of

    saved = recipe_of(attnsurgeon.load(out)).to_dict()
    assert saved["model_args"] == {"num_classes": 7} and saved["weights_key"] == "state_dict"
    assert saved["weights"] == str(files["timm"].resolve())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(attnsurgeon.load(out).eval()(x), _by_hand("raw", files)(x), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_yolo_checkpoint_is_the_base_model_with_its_classes_and_training_continues(cli, tmp_path, monkeypatch):
    """A YOLOv8n trained by ultralytics on 2 classes (its best.pt) as the base: insert, profile and train."""
    pytest.importorskip("ultralytics")
    from test_sources_train import _tiny_dataset
    from ultralytics import YOLO
    from ultralytics.utils.torch_utils import get_num_params

    from attnsurgeon.loading.sources.yolo import train

    data = _tiny_dataset(tmp_path / "data", nc=2)
    args = dict(
        epochs=1,
        imgsz=64,
        batch=2,
        workers=0,
        device="cpu",
        plots=False,
        amp=False,
        verbose=False,
        project=str(tmp_path / "runs"),
        exist_ok=True,
    )
    first = YOLO("yolov8n.yaml")
    first.train(data=str(data), name="base", **args)
    best = first.trainer.best
    assert best.is_file()
    monkeypatch.chdir(tmp_path / "runs" / "base")  # a relative name, as a user types it next to the file
    spec = "yolo:weights/best.pt"
    params = get_num_params(YOLO(str(best)).model)  # ultralytics' own count (what its model summary prints)

    loaded = attnsurgeon.load_model(spec)
    assert loaded.model.nc == 2 and loaded.model.names == {0: "c0", 1: "c1"}
    assert loaded.input_size == (3, 64, 64)  # the training image size, kept
    assert loaded.spec == f"yolo:{best.resolve()}"  # absolute: a saved recipe rebuilds from anywhere

    code, stdout, stderr = cli("insert", spec, "--attn", "cbam", "--after", "model.9", "--json")
    assert code == 0, stderr
    assert [i["module"] for i in json.loads(stdout)["insertions"]] == ["model.9.cbam_after"]
    code, stdout, stderr = cli("profile", spec, "--json", "--min-time", "0.01", "--max-time", "0.05")
    assert code == 0, stderr
    assert json.loads(stdout)["base"]["params"] == params

    out, report = attnsurgeon.insert(spec, "cbam", after="model.9")
    del args["imgsz"]  # the checkpoint's own, as YOLO(best.pt).train(data=...) keeps it
    yolo = train(out, data=str(data), name="again", **args)
    assert yolo.trainer.args.imgsz == 64 and yolo.trainer.model is out
    again = YOLO(str(yolo.trainer.last))
    assert again.model.nc == 2 and "model.9.cbam_after" in dict(again.model.named_modules())


def test_yolo_checkpoint_errors_are_one_line(cli, tmp_path):
    pytest.importorskip("ultralytics")
    code, _, stderr = cli("insert", "best.pt")
    assert _one_error(code, stderr) and "yolo:PATH.pt" in stderr
    code, _, stderr = cli("insert", "yolo:missing/best.pt")
    assert _one_error(code, stderr) and "does not exist" in stderr
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    code, _, stderr = cli("insert", f"yolo:{tmp_path / 'junk.pt'}")
    assert _one_error(code, stderr) and "not an ultralytics checkpoint" in stderr


@pytest.mark.slow
def test_smp_folder_from_save_pretrained_is_the_base_model(cli, tmp_path, monkeypatch):
    smp = pytest.importorskip("segmentation_models_pytorch")
    torch.manual_seed(0)
    smp.Unet("resnet18", encoder_weights=None, classes=3).save_pretrained(str(tmp_path / "unet"))
    monkeypatch.chdir(tmp_path)
    loaded = attnsurgeon.load_model("smp:./unet")
    assert loaded.spec == f"smp:{(tmp_path / 'unet').resolve()}" and loaded.model.segmentation_head[0].out_channels == 3
    out = tmp_path / "unet-scse.safetensors"
    code, stdout, stderr = cli(
        "insert",
        "smp:./unet",
        "--attn",
        "scse",
        "--after",
        "decoder.blocks.*.conv2",
        "--init",
        "identity",
        "--input-size",
        "64",
        "--out",
        out,
        "--json",
    )
    assert code == 0, stderr
    json.loads(stdout)  # smp's own "Loading weights" print stays off stdout
    by_hand = smp.from_pretrained(str(tmp_path / "unet")).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(attnsurgeon.load(out).eval()(x), by_hand(x), rtol=0, atol=1e-5)
    (tmp_path / "empty").mkdir()
    for spec, message in [
        ("smp:./nowhere", "does not exist"),
        ("smp:./empty", "no config.json and no model.safetensors"),
    ]:
        code, _, stderr = cli("insert", spec)
        assert _one_error(code, stderr) and message in " ".join(stderr.split())
    code, _, stderr = cli("insert", "smp:./unet", "--model-arg", "classes=5")
    assert _one_error(code, stderr) and "carries its own" in stderr


def test_a_saved_model_opens_when_no_weights_are_asked_for_and_refuses_a_weights_key(tmp_path):
    """profile SAVED passes weights_key=None along: that is no request (it was refused as one after the merge)."""
    import attnsurgeon
    from attnsurgeon.saving.saved import open_model

    model, _ = attnsurgeon.insert("resnet18", attn="se", stages=[4], input_size=32)
    attnsurgeon.export(model, tmp_path / "se.safetensors")
    loaded = open_model(tmp_path / "se.safetensors", pretrained=False, weights=None, weights_key=None)
    assert loaded.saved == str(tmp_path / "se.safetensors")
    with pytest.raises(AttnSurgeonError, match="carries its own weights and recipe; drop"):
        open_model(tmp_path / "se.safetensors", weights_key="state_dict")
