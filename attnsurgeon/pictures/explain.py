"""Where the model looks, and what its attention gates do: ``attnsurgeon explain``.

For each image (read with the model's own preprocessing), :func:`explain` runs the base model and,
with an insertion, the modified one, and gathers

* Grad-CAM of both models for one class (the base model's top class, or ``class_index``) at one
  layer (the last spatial feature map, or ``layer``), computed by the ``grad-cam`` library
  (``pytorch_grad_cam.GradCAM``) on a copy of the traced graph with an identity tap at that layer;
* the gate values of every attention module — inserted or the model's own — read with forward
  hooks on the submodule whose output is the gate: a block declares it in its file's ``GATES``
  (``{"channel": ("gate", "channel")}`` for SE); for the model's own attention (timm's and
  torchvision's SE) the last sigmoid-like module inside it is the gate. A gate shaped
  ``(N, C, 1, 1)`` is a channel gate, ``(N, 1, H, W)`` a spatial one;
* per gate, its statistics: mean, std, min, max and the fractions near 0 (< 0.05) and near 1 (> 0.95).

:func:`~attnsurgeon.pictures.sheet.write_explanation` draws one sheet per image and a summary across them, and writes
``explain.json`` with every number behind them, all into a temporary folder renamed at the end.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..core.errors import AttnSurgeonError
from .gates import HIGH, LOW, Gate, _gate_entry, find_gates, read_gates
from .gradcam import _check_layer_node, _require_gradcam, gradcam, layer_name, layer_node
from .images import IMAGE_EXTENSIONS, collect_images, load_images, preprocessing

# collect_images and the rest of .images stay importable from here, where the command line imports them
__all__ = ["ModelView", "Explanation", "explain", "IMAGE_EXTENSIONS", "collect_images", "load_images", "preprocessing"]


@dataclass
class ModelView:
    """What one model (base or modified) says about one image."""

    top: list[tuple[int, float]]  # the top-5 classes and probabilities
    cam: Any  # (H, W) numpy array in [0, 1]
    gates: dict[tuple[str, str], Any] = field(default_factory=dict)  # (module, name) -> gate tensor of this image


@dataclass
class Explanation:
    model: str
    source: str
    input_size: tuple[int, ...]
    images: list[str]
    pixels: list[Any]  # (H, W, 3) floats in [0, 1]: what the model saw, un-normalised
    class_index: list[int]
    class_names: list[str | None]
    layer: str
    base: list[ModelView]
    modified: list[ModelView] | None
    gates: list[Gate]
    preprocessing: str
    insertions: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    class_given: bool = False  # --class K, rather than the base model's top class
    inputs: Any = field(default=None, repr=False)  # the preprocessed batch both models ran on
    base_model: Any = field(default=None, repr=False)  # the traced base model (a GraphModule)
    modified_model: Any = field(default=None, repr=False)  # ... and the modified one, where there is one

    def views(self) -> dict[str, list[ModelView]]:
        return {"base": self.base, **({"modified": self.modified} if self.modified is not None else {})}

    @property
    def gate_view(self) -> str:
        """The model whose gates the sheets draw: the modified one where there is one."""
        return "modified" if self.modified is not None else "base"

    def to_dict(self) -> dict[str, Any]:
        per_image = []
        for i, image in enumerate(self.images):
            entry: dict[str, Any] = {"image": image, "class": self.class_index[i], "class_name": self.class_names[i]}
            for name, views in self.views().items():
                v = views[i]
                entry[name] = {
                    "top5": [{"class": k, "probability": round(p, 6)} for k, p in v.top],
                    "gradcam": {"peak_yx": list(map(int, _peak(v.cam))), "mean": float(v.cam.mean())},
                    "gates": [
                        _gate_entry(g, v.gates[(g.module, g.name)]) for g in self.gates if (g.module, g.name) in v.gates
                    ],
                }
            per_image.append(entry)
        return {
            "model": self.model,
            "source": self.source,
            "input_size": list(self.input_size),
            "preprocessing": self.preprocessing,
            "gradcam": {
                "library": "pytorch-grad-cam (GradCAM)",
                "layer": self.layer,
                "class": "given (--class)" if self.class_given else "the base model's top class",
            },
            "insertions": self.insertions,
            "gates": [
                {
                    "module": g.module,
                    "gate": g.name,
                    "submodule": g.path,
                    "kind": g.kind,
                    "origin": g.origin,
                    "type": g.type,
                }
                for g in self.gates
            ],
            "saturation_thresholds": {"near_0": f"< {LOW}", "near_1": f"> {HIGH}"},
            "images": per_image,
            "summary": self.summary(),
            "notes": self.notes,
        }

    def summary(self) -> dict[str, Any]:
        """Across images, per model and gate: the mean of the per-image means, and how much the gate
        values vary between images (the mean over channels of their std across images)."""
        import torch

        out: dict[str, Any] = {}
        for name, views in self.views().items():
            rows = []
            for g in self.gates:
                values = [v.gates[(g.module, g.name)] for v in views if (g.module, g.name) in v.gates]
                if not values:
                    continue
                stacked = (
                    torch.stack([t.float().flatten() for t in values])
                    if len({t.numel() for t in values}) == 1
                    else None
                )
                rows.append(
                    {
                        "module": g.module,
                        "gate": g.name,
                        "mean": float(sum(t.float().mean() for t in values) / len(values)),
                        "std_across_images": float(stacked.std(0, unbiased=False).mean())
                        if stacked is not None and len(values) > 1
                        else 0.0,
                    }
                )
            out[name] = rows
        return out


def _peak(cam: Any) -> tuple[int, int]:
    import numpy as np

    y, x = np.unravel_index(int(np.argmax(cam)), cam.shape)  # cam is (H, W)
    return int(y), int(x)


def explain(
    model: Any,
    images: Iterable[str | os.PathLike],
    attn: str | None = None,
    position: str | None = None,
    stages: Iterable[int] | None = None,
    blocks: Iterable[str] | str | None = None,
    init: str = "default",
    *,
    plan: list | None = None,
    class_index: int | None = None,
    layer: str | None = None,
    input_size: Any = None,
    pretrained: bool = False,
    weights: Any = None,
    weights_key: str | None = None,
    model_args: dict[str, Any] | None = None,
    replace: bool = False,
    progress: Callable[[str], None] | None = None,
    **block_options: Any,
) -> Explanation:
    """Grad-CAM and attention gates of a model (and, with ``attn`` or ``plan``, of its modified twin)
    on images; takes the insertion arguments of :func:`attnsurgeon.insert`.

    Example:
        >>> e = explain("resnet18", ["cat.jpg"], attn="cbam", input_size=64)
        >>> e.to_dict()["images"][0]["modified"]["gates"][0]["mean"]
    """
    from ..rewriting.apply import make_spec

    say = progress or (lambda message: None)
    _require_gradcam()
    files = collect_images(images)  # before any model is built
    specs = list(plan or [])
    if attn is not None:
        specs.append(make_spec(attn, position, stages, blocks, init, replace=replace, **block_options))
    loading = {"pretrained": pretrained, "weights": weights, "weights_key": weights_key}
    loaded, size, base_gm, modified, report = _open_models(model, specs, input_size, loading, model_args, say)
    base_node, mod_node = _layer_nodes(base_gm, modified, layer)

    say(f"Reading {len(files)} image{'s' * (len(files) != 1)}")
    transform, mean, std, described = preprocessing(loaded, size)
    x, pixels = load_images(files, transform, mean, std)
    notes = _notes(loaded, report)
    insertions = report.insertions if report else []
    say("Finding the gates")
    gates = find_gates(modified if modified is not None else base_gm, insertions, base_gm, notes)
    base_gates = find_gates(base_gm, [], base_gm, []) if modified is not None else gates

    views: dict[str, list[ModelView]] = {}
    classes: list[int] = []
    for name, gm, node, own_gates in (
        ("base", base_gm, base_node, base_gates),
        ("modified", modified, mod_node, gates),
    ):
        if gm is not None:
            views[name], classes = _views(name, gm, node, own_gates, x, classes, class_index, layer, loaded.spec, say)
    for g in base_gates:  # the base's own attention, where there is a modified model, keeps its kind
        if g.kind is None:
            g.kind = "channel"
    return Explanation(
        loaded.spec,
        loaded.source,
        tuple(size),
        [str(f) for f in files],
        pixels,
        classes,
        [_class_name(loaded, k) for k in classes],
        layer or layer_name(base_node),
        views["base"],
        views.get("modified"),
        gates if modified is not None else base_gates,
        described,
        [i.to_dict() for i in insertions],
        notes,
        class_index is not None,
        x,
        base_gm,
        modified,
    )


def _open_models(
    model: Any,
    specs: list,
    input_size: Any,
    loading: dict[str, Any],
    model_args: dict[str, Any] | None,
    say: Callable[[str], None],
) -> tuple[Any, Any, Any, Any, Any]:
    """(the loaded model, its input size, its traced GraphModule, the modified model and its report,
    or None, None without insertions); both in eval mode."""
    from ..graph.inspect import inspect_model
    from ..graph.layout import resolve_input_size
    from ..loading.models import as_loaded, refuse_saved
    from ..rewriting.apply import apply_plan

    refuse_saved(model)
    say("Loading the model")
    loaded = as_loaded(model, **loading, **(model_args or {}))
    size = resolve_input_size(input_size, loaded.input_size)
    if len(size) != 3 or size[0] != 3:
        raise AttnSurgeonError(f"explain reads RGB images: {loaded.spec} takes inputs of {tuple(size)}, not 3×H×W")
    say("Tracing")
    _, anatomy = inspect_model(loaded, input_size=size)
    if anatomy.target is not None:
        raise AttnSurgeonError(
            f"{loaded.spec} does not trace whole (only {', '.join(anatomy.target)}): explain needs a "
            "classifier whose whole forward traces"
        )
    base_gm = anatomy.gm
    base_gm.eval()
    modified, report = None, None
    if specs:
        say("Inserting")
        modified, report = apply_plan(loaded, specs, input_size=size)
        modified.eval()
    return loaded, size, base_gm, modified, report


def _layer_nodes(base_gm: Any, modified: Any, layer: str | None) -> tuple[Any, Any]:
    """The node Grad-CAM reads in each model (``layer``, or the last spatial one); None without a modified model."""
    base_node = layer_node(base_gm, layer)
    _check_layer_node(base_node, layer, base_gm, "base")
    mod_node = None
    if modified is not None:
        mod_node = layer_node(modified, layer)
        _check_layer_node(mod_node, layer, modified, "modified")
    return base_node, mod_node


def _notes(loaded: Any, report: Any) -> list[str]:
    """What loading and the insertion said, and first, for an untrained library model, that its maps mean nothing."""
    notes: list[str] = list(report.notes if report else loaded.notes)
    if loaded.weights is None and loaded.source in ("torchvision", "timm"):  # a library model, built untrained
        notes.insert(
            0,
            f"{loaded.spec} has random weights (no --pretrained or --weights): its classes, probabilities "
            "and Grad-CAM maps say nothing about the images",
        )
    return notes


def _views(
    name: str,
    gm: Any,
    node: Any,
    own_gates: list[Gate],
    x: Any,
    classes: list[int],
    class_index: int | None,
    layer: str | None,
    spec: str,
    say: Callable[[str], None],
) -> tuple[list[ModelView], list[int]]:
    """One model on the images: its top-5 classes, gate values and Grad-CAM map per image; and the
    classes Grad-CAM explains (``class_index``, else the first model's top class), once chosen."""
    import torch

    say(f"Running the {name} model")
    with torch.no_grad():
        logits = gm(x)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise AttnSurgeonError(
            f"explain needs a classifier: {spec} returns "
            f"{type(logits).__name__ if not isinstance(logits, torch.Tensor) else tuple(logits.shape)}, "
            "not one (N, classes) tensor of scores"
        )
    if not classes:
        n = logits.shape[1]
        if class_index is not None and not 0 <= class_index < n:
            raise AttnSurgeonError(f"--class {class_index} is out of range: {spec} has {n} classes (0..{n - 1})")
        classes = [class_index] * len(x) if class_index is not None else logits.argmax(1).tolist()
    probs = logits.float().softmax(1)
    top = probs.topk(min(5, probs.shape[1]), dim=1)
    values = read_gates(gm, own_gates, x)
    say(f"Grad-CAM of the {name} model at {layer or layer_name(node)}")
    cams = gradcam(gm, node, x, classes)
    views = [
        ModelView(
            list(zip(top.indices[i].tolist(), top.values[i].tolist(), strict=True)),
            cams[i],
            {k: v[i] for k, v in values.items()},
        )
        for i in range(len(x))
    ]
    return views, classes


def _class_name(loaded: Any, k: int) -> str | None:
    """The class's name where the model has published weights to say it (``tabby``), else None."""
    if loaded.weights != "pretrained":
        return None
    try:
        if loaded.source == "torchvision":
            import torchvision

            return torchvision.models.get_model_weights(loaded.name).DEFAULT.meta["categories"][k]
        if loaded.source == "timm":
            from timm.data import ImageNetInfo, infer_imagenet_subset

            subset = infer_imagenet_subset(loaded.model)
            return ImageNetInfo(subset).index_to_description(k) if subset else None
    except Exception:  # noqa: BLE001  (names are a courtesy)
        return None
    return None
