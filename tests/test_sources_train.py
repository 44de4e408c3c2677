"""Back into the user's pipeline: a rewritten YOLO trains in ultralytics' own trainer with its blocks kept
(the checkpoint loads with ``YOLO(path)``), predicts and validates through ``YOLO``; traced parts keep their
attributes and their tolerant forward through deepcopy and pickling (ultralytics' EMA and checkpoints)."""

import copy
import io

import numpy as np
import pytest
import torch

from attnsurgeon import insert, load_model
from attnsurgeon.graph.traced_part import TracedPart
from attnsurgeon.loading.samples import flatten_outputs, max_abs_diff

ultralytics = pytest.importorskip("ultralytics")

SIZE = (3, 64, 64)


def _tiny_dataset(root, n=4, side=64, nc=2):
    """``n`` random images with one box each, YOLO-format labels, and the data yaml (train = val)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(root / "images" / f"{i}.jpg")
        cx, cy = rng.uniform(0.3, 0.7, 2)
        (root / "labels" / f"{i}.txt").write_text(f"{i % nc} {cx:.3f} {cy:.3f} 0.400 0.400\n")
    names = "".join(f"  {k}: c{k}\n" for k in range(nc))
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images\nval: images\nnames:\n{names}")
    return data


def _inserted(model, report):
    return {i.module: type(model.get_submodule(i.module)) for i in report.insertions}


@pytest.mark.slow
def test_yolo_trains_one_epoch_in_ultralytics_trainer_and_the_checkpoint_keeps_the_blocks(tmp_path):
    from ultralytics import YOLO
    from ultralytics.nn.modules.block import Bottleneck

    from attnsurgeon.loading.sources.yolo import train

    data = _tiny_dataset(tmp_path / "data")
    loaded = load_model("yolo:yolov8n", nc=2)
    bottlenecks = sum(isinstance(m, Bottleneck) for m in loaded.model.modules())
    out, report = insert(loaded, "se", input_size=SIZE)
    blocks = _inserted(out, report)
    assert len(blocks) == bottlenecks  # one per C2f bottleneck
    before = {k: v.clone() for k, v in out.state_dict().items() if ".se." in k}
    yolo = train(
        out,
        data=str(data),
        epochs=1,
        imgsz=64,
        batch=2,
        workers=0,
        device="cpu",
        plots=False,
        amp=False,
        project=str(tmp_path / "runs"),
        name="t",
        exist_ok=True,
        verbose=False,
    )
    last = yolo.trainer.last
    assert last.is_file()
    # the blocks were trained, in the model the trainer trained (not a copy rebuilt from the yaml)
    assert any(not torch.equal(before[k], v) for k, v in out.state_dict().items() if k in before)

    loaded = YOLO(str(last))
    assert _inserted(loaded.model, report) == blocks  # each block, at its path, of its type
    assert {k for k in loaded.model.state_dict()} == {k for k in out.state_dict()}
    assert loaded.model.nc == 2
    loaded.model.float().eval()
    x = torch.rand(1, *SIZE)
    assert flatten_outputs(loaded.model(x))[0].shape == flatten_outputs(out.eval()(x))[0].shape
    results = loaded.predict(np.zeros((64, 64, 3), dtype=np.uint8), imgsz=64, device="cpu", verbose=False)
    assert len(results) == 1 and results[0].boxes is not None


@pytest.mark.slow  # ultralytics' predict and val: 3-6 s, kept out of the fast subset's two minutes
def test_yolo_predict_and_val_through_the_yolo_object(tmp_path):
    from ultralytics import YOLO

    from attnsurgeon.loading.sources.yolo import to_yolo

    data = _tiny_dataset(tmp_path / "data")
    out, report = insert(load_model("yolo:yolov8n", nc=2), "cbam", after="model.9", input_size=SIZE)
    yolo = to_yolo(out)
    assert isinstance(yolo, YOLO) and yolo.model is out and yolo.task == "detect"
    image = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    results = yolo.predict(image, imgsz=64, device="cpu", verbose=False, conf=0.0)
    assert len(results) == 1 and results[0].orig_shape == (64, 64)
    assert len(results[0].boxes) > 0  # conf=0: the detector's own candidates came through NMS
    assert "model.9.cbam_after" in dict(yolo.model.named_modules())  # predict's fuse() kept the block
    metrics = yolo.val(
        data=str(data),
        imgsz=64,
        batch=2,
        workers=0,
        device="cpu",
        plots=False,
        verbose=False,
        project=str(tmp_path / "runs"),
        name="v",
        exist_ok=True,
    )
    assert 0.0 <= metrics.box.map50 <= 1.0


@pytest.mark.slow  # ultralytics' trainer set up: 3-6 s, kept out of the fast subset's two minutes
def test_the_trainer_refuses_a_model_with_another_class_count(tmp_path):
    from attnsurgeon import AttnSurgeonError
    from attnsurgeon.loading.sources.yolo import train

    data = _tiny_dataset(tmp_path / "data", nc=2)
    out, _ = insert(load_model("yolo:yolov8n"), "eca", input_size=SIZE)  # 80 classes, as the yaml
    with pytest.raises(AttnSurgeonError, match="has 80 classes and the data 2: build it with nc=2"):
        train(
            out,
            data=str(data),
            epochs=1,
            imgsz=64,
            batch=2,
            workers=0,
            device="cpu",
            plots=False,
            project=str(tmp_path / "runs"),
            name="t",
            exist_ok=True,
        )


def _pickled(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.slow  # YOLO parts copied and pickled, 3 s (test_trace_constants keeps a fast pickle check)
def test_traced_parts_keep_their_attributes_through_deepcopy_and_pickle():
    """ultralytics' EMA deep-copies the model and reads each layer's ``f``/``i``; its checkpoints pickle it."""
    out, report = insert(load_model("yolo:yolov8n"), "se", input_size=SIZE)
    out.eval()
    x = torch.randn(1, *SIZE)
    reference = flatten_outputs(out(x))
    for again in (copy.deepcopy(out), _pickled(out), _pickled(copy.deepcopy(out))):
        layer = again.model[2]
        assert (layer.f, layer.i, type(layer).__name__) == (out.model[2].f, 2, "C2f")
        assert isinstance(layer, TracedPart)  # the behaviour is its class's, not patched onto a copy
        assert _inserted(again, report) == _inserted(out, report)
        assert max_abs_diff(flatten_outputs(again(x)), reference) == 0.0


def test_hugging_face_parts_keep_their_tolerant_forward_through_deepcopy_and_pickle():
    """A Hugging Face model calls its rewritten encoder with ``output_hidden_states``/``return_dict``: the
    part's forward that accepts those survives a copy (and still refuses what the graph would ignore)."""
    pytest.importorskip("transformers")
    config = dict(depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 64, 128], embedding_size=8, num_labels=3)
    out, report = insert(load_model("hf:resnet", **config), "se", input_size=SIZE)
    out.eval()
    x = torch.randn(2, *SIZE)
    labels = torch.tensor([0, 2])
    reference = out(pixel_values=x, labels=labels)
    for again in (copy.deepcopy(out), _pickled(out)):
        result = again(pixel_values=x, labels=labels)
        assert type(result) is type(reference) and torch.equal(result.loss, reference.loss)
        assert max_abs_diff(result.logits, reference.logits) == 0.0
        encoder = again.get_submodule(report.insertions[0].module.split(".stages")[0])
        assert isinstance(encoder, TracedPart)
        with pytest.raises(TypeError, match="cannot take output_hidden_states"):
            encoder(torch.randn(2, 16, 16, 16), output_hidden_states=True)


@pytest.mark.slow
def test_smp_unet_with_blocks_exports_to_every_format_and_each_file_reproduces_it(tmp_path):
    """Each file is read back by its own runtime (torch.export, TorchScript, onnxruntime; safetensors by
    attnsurgeon.load, which rebuilds the architecture from the recipe) and run on a new input."""
    pytest.importorskip("segmentation_models_pytorch")
    onnxruntime = pytest.importorskip("onnxruntime")
    from attnsurgeon import export, load

    out, report = insert(load_model("smp:Unet:resnet18"), "scse", after="decoder.blocks.*.conv2", input_size=SIZE)
    out.eval()
    x = torch.randn(3, *SIZE)  # a batch none of the exports was checked at
    with torch.no_grad():
        reference = out(x)
    readers = {
        "pt2": lambda p: torch.export.load(str(p)).module(),
        "ts": lambda p: torch.jit.load(str(p)),
        "safetensors": lambda p: load(p).eval(),
    }
    for ext, read in readers.items():
        export(out, tmp_path / f"unet.{ext}")
        with torch.no_grad():
            assert max_abs_diff(read(tmp_path / f"unet.{ext}")(x), reference) <= 1e-5, ext
    export(out, tmp_path / "unet.onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "unet.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    assert max_abs_diff(got, reference) <= 1e-4
    again = load(tmp_path / "unet.safetensors")
    assert {i.module for i in report.insertions} <= {n for n, _ in again.named_modules()}


def test_hugging_face_save_pretrained_keeps_the_block_weights_and_from_pretrained_drops_them(tmp_path):
    """What the README says of save_pretrained: the file holds every weight, the blocks' too; from_pretrained
    rebuilds the class from its config and reports the blocks' weights as unexpected; the same insertion on a
    fresh model takes the file's state dict back whole."""
    pytest.importorskip("transformers")
    from safetensors.torch import load_file

    config = dict(depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 64, 128], embedding_size=8, num_labels=3)
    out, report = insert(load_model("hf:resnet", **config), "se", input_size=SIZE)
    blocks = {i.module for i in report.insertions}
    out.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert set(saved) == set(out.state_dict())
    assert {k.rsplit(".", 2)[0] for k in saved if any(k.startswith(b + ".") for b in blocks)} == blocks

    again, info = type(out).from_pretrained(tmp_path, output_loading_info=True)
    assert set(info["unexpected_keys"]) == {k for k in saved if any(k.startswith(b + ".") for b in blocks)}
    assert not blocks & {n for n, _ in again.named_modules()}

    fresh, _ = insert(load_model("hf:resnet", **config), "se", input_size=SIZE)
    fresh.load_state_dict(saved)  # strict: every name matches
    x = torch.randn(2, *SIZE)
    out.eval(), fresh.eval()
    assert max_abs_diff(fresh(x).logits, out(x).logits) == 0.0


def test_each_extra_installs_what_its_librarys_own_workflows_need():
    """``pip install 'attnsurgeon[hf]'`` then ``transformers.Trainer`` failed: it needs accelerate; ultralytics'
    ONNX export warned 'simplifier failure' without onnxslim (issue 29)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    extras = {
        k: {d.split(">")[0].split("[")[0] for d in v}
        for k, v in tomllib.loads(text)["project"]["optional-dependencies"].items()
    }
    assert {"transformers", "accelerate"} <= extras["hf"]
    assert {"ultralytics", "onnx", "onnxruntime", "onnxslim"} <= extras["yolo"]  # ultralytics' export(format="onnx")
    assert extras["hf"] | extras["yolo"] <= extras["test"]


@pytest.mark.slow
def test_hugging_face_model_with_blocks_trains_in_transformers_trainer(tmp_path):
    """The docs' recipe: the rewritten model in ``transformers.Trainer`` (which needs accelerate) for two
    steps; the loss comes from the model's own ``labels`` path and the blocks' weights move."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")

    config = dict(depths=[1, 1], hidden_sizes=[8, 16], embedding_size=8, num_labels=2)
    model, report = insert(load_model("hf:resnet", **config), "se", input_size=SIZE)
    block = report.insertions[0].module
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(block + ".")}
    g = torch.Generator().manual_seed(0)
    data = [{"pixel_values": torch.randn(*SIZE, generator=g), "labels": i % 2} for i in range(4)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=0.1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_strategy="no",
        dataloader_num_workers=0,
    )
    result = transformers.Trainer(model=model, args=args, train_dataset=data).train()
    assert result.global_step == 2 and np.isfinite(result.training_loss)
    after = model.state_dict()
    assert before and any(not torch.equal(v, after[k]) for k, v in before.items())
