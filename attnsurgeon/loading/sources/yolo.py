"""Ultralytics YOLO (``yolo:yolov8n``, ``yolo11s-seg``, ``yolov8n-cls``): built from the package's own
yaml, with no download; ``--pretrained`` loads the published ``.pt`` from the working folder or
ultralytics' weights folder, else downloads it where the network is reachable.

The model is ultralytics' own ``DetectionModel`` (``SegmentationModel``, ``ClassificationModel``,
…, chosen by ultralytics from the yaml), so the rewritten one keeps its ``predict``/``val`` path:
:func:`to_yolo` puts it in a ``YOLO`` object. ultralytics' trainer rebuilds its model from the yaml
and would drop the blocks; :func:`trainer` is the task's trainer with ``get_model`` returning the
rewritten model, and :func:`train` runs it (``best.pt``/``last.pt`` load with ``YOLO(path)``, blocks in).

``yolo:PATH.pt`` starts from an ultralytics checkpoint (the user's ``best.pt``, or a published one by
path): its class count, names and training image size are kept, so that :func:`train` continues on
the user's data (``data=`` given, as ``YOLO(PATH).train(data=...)`` takes it). ultralytics' ``.pt``
is a pickle by design and is read as ``YOLO(PATH)`` reads it, which runs it: a file the user
trusts. (``--weights`` never reads one so.)
"""

from __future__ import annotations

import importlib.util
import logging
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from ...core.errors import AttnSurgeonError, did_you_mean

LIBRARY, EXTRA = "ultralytics", "yolo"
_SCALED = re.compile(r"^(yolo(?:e-)?v?\d+)(.*)$")  # yolov8-seg -> yolov8{n,s,m,l,x}-seg


@lru_cache(maxsize=1)
def names() -> list[str]:
    """Every model the package's yaml files define, one per scale (``yolov8n`` … ``yolov8x``)."""
    spec = importlib.util.find_spec(LIBRARY)
    assert spec is not None and spec.submodule_search_locations is not None  # read only where it is installed
    root = Path(next(iter(spec.submodule_search_locations))) / "cfg" / "models"
    out: list[str] = []
    for path in sorted(root.rglob("*.yaml")):
        text = path.read_text(errors="replace")
        scales = re.search(r"^scales:.*?\n((?:[ \t]+.*\n|\s*#.*\n|\s*\n)*)", text, re.M)
        found = re.findall(r"^[ \t]+([a-z]):", scales.group(1), re.M) if scales else []
        match = _SCALED.match(path.stem)
        if found and match:
            out += [f"{match.group(1)}{s}{match.group(2)}" for s in found]
        else:
            out.append(path.stem)
    return sorted(set(out))


def is_checkpoint(name: str) -> bool:
    """``yolo:runs/train/weights/best.pt``: an ultralytics checkpoint, not a yaml's name."""
    return name.lower().endswith(".pt")


def check(name: str) -> None:
    if is_checkpoint(name):
        path = Path(name).expanduser()
        if not path.is_file():
            published = (
                f"; yolo:{path.stem} --pretrained loads ultralytics' published one" if path.stem in names() else ""
            )
            raise AttnSurgeonError(f"ultralytics checkpoint '{name}' does not exist{published}")
        return
    if name not in names():
        raise AttnSurgeonError(
            f"unknown YOLO model '{name}' (not a yaml of ultralytics)."
            + did_you_mean(name, names())
            + " `attnsurgeon list models 'yolo:*'` lists them."
        )


def _task_classes() -> dict[str, Any]:
    from ultralytics.nn import tasks

    return {
        "detect": tasks.DetectionModel,
        "segment": tasks.SegmentationModel,
        "classify": tasks.ClassificationModel,
        "pose": tasks.PoseModel,
        "obb": tasks.OBBModel,
    }


def build(name: str, pretrained: bool, kwargs: Mapping[str, Any]) -> Any:
    """ultralytics' model for ``name``: from ``NAME.yaml``, the published ``NAME.pt``, or a checkpoint file."""
    if is_checkpoint(name):
        return _checkpoint(name, pretrained, kwargs)
    if pretrained:
        if kwargs:
            raise AttnSurgeonError(f"--pretrained loads yolo:{name} as published; drop {dict(kwargs)}")
        with quiet():
            return _published(name)
    from ultralytics.nn.tasks import guess_model_task, yaml_model_load

    cfg = yaml_model_load(f"{name}.yaml")
    task = guess_model_task(cfg)
    cls = _task_classes().get(task)
    if cls is None:
        raise AttnSurgeonError(f"yolo:{name} is a '{task}' model; attnsurgeon builds {', '.join(_task_classes())}")
    with quiet():
        return cls(cfg, verbose=False, **kwargs)


@contextmanager
def quiet() -> Iterator[None]:
    """ultralytics' logger below warnings: it logs a model summary on stdout whenever it builds a model (a
    classifier's even with ``verbose=False``), which is not what a user of attnsurgeon asked to see."""
    from ultralytics.utils import LOGGER

    level = LOGGER.level
    LOGGER.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        LOGGER.setLevel(level)


def _published(name: str) -> Any:
    from ultralytics.nn.tasks import load_checkpoint
    from ultralytics.utils import ASSETS_URL, SETTINGS

    from ...core.errors import one_line
    from ..network import require_network

    file = f"{name}.pt"
    places = [Path.cwd() / file, Path(SETTINGS["weights_dir"]) / file]
    local = next((p for p in places if p.is_file()), None)
    url = f"{ASSETS_URL}/{file}"
    tried = f"{', '.join(map(str, places))} and {url}"
    if local is None:
        require_network(url, tried)
    try:
        model, _ = load_checkpoint(str(local or file))  # ultralytics downloads a bare name it does not have
    except Exception as exc:
        raise AttnSurgeonError(
            f"could not load ultralytics' published weights for '{name}' (tried {tried}): "
            f"{one_line(exc)}. Download {file} where the network is reachable."
        ) from exc
    return model.float()


def _checkpoint(name: str, pretrained: bool, kwargs: Mapping[str, Any]) -> Any:
    """The model of an ultralytics checkpoint, read as ``YOLO(path)`` reads it (a pickle: a file the user trusts)."""
    from ultralytics.nn.tasks import load_checkpoint

    from ...core.errors import one_line

    if pretrained:
        raise AttnSurgeonError(f"yolo:{name} carries its own weights: drop --pretrained")
    if kwargs:
        raise AttnSurgeonError(
            f"yolo:{name} carries its own architecture and classes: drop {dict(kwargs)} "
            "(a new class count is a new model: yolo:NAME with --model-arg nc=N)"
        )
    try:
        model, _ = load_checkpoint(str(Path(name).expanduser()))
    except Exception as exc:
        raise AttnSurgeonError(f"'{name}' is not an ultralytics checkpoint that YOLO() loads: {one_line(exc)}") from exc
    return model.float()


def input_size(model: Any, name: str) -> tuple[int, ...]:
    """ultralytics' default image size: 640 (224 for the classifiers), or the checkpoint's own."""
    from ultralytics.utils import DEFAULT_CFG

    side = (getattr(model, "args", None) or {}).get("imgsz") if isinstance(getattr(model, "args", None), dict) else None
    if not isinstance(side, int):
        side = 224 if type(model).__name__ == "ClassificationModel" else int(DEFAULT_CFG.imgsz)
    return (int(model.yaml.get("channels", 3)) if isinstance(getattr(model, "yaml", None), dict) else 3, side, side)


def to_yolo(model: Any) -> Any:
    """``model`` (a rewritten ``DetectionModel`` …) inside ultralytics' ``YOLO`` object, for its
    ``predict``, ``val`` and ``train`` (with :func:`trainer`)."""
    from ultralytics import YOLO
    from ultralytics.cfg import DEFAULT_CFG_DICT

    with quiet():  # YOLO builds a model from the yaml again (and logs its summary), to be replaced below
        yolo = YOLO(_yaml_of(model), verbose=False)  # the task, overrides and callbacks ultralytics sets up
    if getattr(model, "pt_path", None) and isinstance(getattr(model, "args", None), dict):
        # from a checkpoint: the training arguments YOLO(path) keeps (image size, data, task)
        yolo.overrides.update(YOLO._reset_ckpt_args(model.args))
    model.task = yolo.task
    model.args = {**DEFAULT_CFG_DICT, **yolo.overrides}
    yolo.model = model
    return yolo


def _yaml_of(model: Any) -> str:
    cfg = getattr(model, "yaml", None)
    file = cfg.get("yaml_file") if isinstance(cfg, dict) else None
    if not file:
        raise AttnSurgeonError(
            f"{type(model).__name__} is not an ultralytics model built from a yaml (load it with yolo:NAME)"
        )
    return file


def trainer(model: Any) -> type:
    """ultralytics' trainer class for ``model``'s task whose ``get_model`` returns ``model`` itself:
    the trainer would otherwise rebuild the model from its yaml (dropping the blocks) and copy the
    weights that match. Pass it as ``YOLO.train(trainer=...)``; :func:`train` does."""
    return _trainer(to_yolo(model))


def _trainer(yolo: Any) -> type:
    model = yolo.model
    base = yolo.task_map[yolo.task]["trainer"]

    def get_model(self: Any, cfg: Any = None, weights: Any = None, verbose: bool = True) -> Any:
        nc = model.yaml.get("nc")
        if nc is not None and nc != self.data["nc"]:
            raise AttnSurgeonError(
                f"the rewritten model has {nc} classes and the data {self.data['nc']}: build it "
                f"with nc={self.data['nc']} (load_model('yolo:NAME', nc={self.data['nc']})) "
                "before inserting the blocks"
            )
        return model

    return type(f"AttnSurgeon{base.__name__}", (base,), {"get_model": get_model, "__module__": __name__})


def train(model: Any, **args: Any) -> Any:
    """Train ``model`` in ultralytics' own trainer, blocks kept; ``args`` as ``YOLO.train`` takes them
    (``data=``, ``epochs=``, ``imgsz=``, ``device=``, ``project=`` …). Returns the ``YOLO`` object,
    which then holds the trained model (the trainer's ``best.pt``) and the trainer (``.trainer.last``)."""
    yolo = to_yolo(model)
    yolo.train(trainer=_trainer(yolo), **args)
    return yolo


is_local = is_checkpoint  # a file or folder of the user's: recorded by its absolute path (sources.__init__)
