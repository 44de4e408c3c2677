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

:func:`write_explanation` draws one sheet per image and a summary across them, and writes
``explain.json`` with every number behind them, all into a temporary folder renamed at the end.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from ..core.errors import AttnSurgeonError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
LOW, HIGH = 0.05, 0.95  # a gate value below LOW is 'near 0', above HIGH 'near 1'
TAP = "attnsurgeon_cam_tap"


@dataclass
class Gate:
    """One gate to read: the attention module, the gate's name in it, the submodule that outputs it."""

    module: str  # the attention module (``layer3.0.cbam``, ``blocks.1.0.se``)
    name: str  # ``channel`` / ``spatial`` / the block's own name for it
    path: str  # the submodule whose output is the gate (``layer3.0.cbam.channel.gate``)
    kind: str | None  # "channel" | "spatial" | None (from the output's shape)
    origin: str  # "inserted" | "existing"
    type: str  # class of the attention module


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
                    "gates": [_gate_entry(g, v.gates[(g.module, g.name)]) for g in self.gates if (g.module, g.name) in v.gates],
                }
            per_image.append(entry)
        return {
            "model": self.model,
            "source": self.source,
            "input_size": list(self.input_size),
            "preprocessing": self.preprocessing,
            "gradcam": {"library": "pytorch-grad-cam (GradCAM)", "layer": self.layer,
                        "class": "given (--class)" if self.class_given else "the base model's top class"},
            "insertions": self.insertions,
            "gates": [{"module": g.module, "gate": g.name, "submodule": g.path, "kind": g.kind, "origin": g.origin,
                       "type": g.type} for g in self.gates],
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
                stacked = torch.stack([t.float().flatten() for t in values]) if len({t.numel() for t in values}) == 1 else None
                rows.append({
                    "module": g.module, "gate": g.name,
                    "mean": float(sum(t.float().mean() for t in values) / len(values)),
                    "std_across_images": float(stacked.std(0, unbiased=False).mean()) if stacked is not None and len(values) > 1 else 0.0,
                })
            out[name] = rows
        return out


def _gate_entry(g: Gate, t: Any) -> dict[str, Any]:
    return {"module": g.module, "gate": g.name, "kind": g.kind, "shape": list(t.shape), **gate_stats(t)}


def gate_stats(t: Any) -> dict[str, float]:
    """mean, std (population), min, max, and the fractions near 0 and near 1 of a gate tensor."""
    v = t.detach().double().flatten()
    return {
        "mean": float(v.mean()), "std": float(v.std(unbiased=False)) if v.numel() > 1 else 0.0,
        "min": float(v.min()), "max": float(v.max()),
        "near_0": float((v < LOW).double().mean()), "near_1": float((v > HIGH).double().mean()),
    }


def _peak(cam: Any) -> tuple[int, int]:
    import numpy as np

    return tuple(int(i) for i in np.unravel_index(int(np.argmax(cam)), cam.shape))


# --------------------------------------------------------------------------- images and preprocessing


def collect_images(images: Iterable[str | os.PathLike]) -> list[Path]:
    """Files named, and the images in folders named (sorted); each checked to be a readable image."""
    from PIL import Image

    files: list[Path] = []
    for item in images:
        p = Path(item).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
            if not found:
                raise AttnSurgeonError(f"folder '{p}' holds no image ({', '.join(IMAGE_EXTENSIONS)})")
            files += found
        elif not p.exists():
            raise AttnSurgeonError(f"image '{p}' does not exist")
        else:
            files.append(p)
    if not files:
        raise AttnSurgeonError("no image given: pass --image FILE (repeat it, or give a folder)")
    for f in files:
        try:
            with Image.open(f) as im:
                im.verify()
        except Exception as exc:  # PIL's errors, and whatever a plugin patched into Image.open raises (ultralytics' HEIF)
            raise AttnSurgeonError(f"cannot read image '{f}': it is not an image file PIL can open ({type(exc).__name__})") from None
    return files


def preprocessing(loaded: Any, size: tuple[int, ...]) -> tuple[Callable, Any, Any, str]:
    """The model's own preprocessing for ``size`` (C, H, W): timm's data config, torchvision's weights
    transforms, else a plain resize to [0, 1]. Returns (transform PIL -> tensor, mean, std, description)."""
    from torchvision import transforms as T

    model = loaded.model
    h, w = int(size[-2]), int(size[-1])
    if getattr(model, "pretrained_cfg", None) is not None and loaded.source == "timm":
        from timm.data import create_transform, resolve_data_config

        cfg = resolve_data_config({"input_size": (3, h, w)}, model=model)
        transform = create_transform(**cfg)
        return transform, cfg["mean"], cfg["std"], f"timm data config: {_config_text(cfg)}"
    if loaded.source == "torchvision":
        import torchvision

        try:
            own = torchvision.models.get_model_weights(loaded.name).DEFAULT.transforms()
        except Exception:  # noqa: BLE001  (models without published weights)
            own = None
        if own is not None and hasattr(own, "crop_size"):
            crop = own.crop_size[0]
            resize = round(own.resize_size[0] * h / crop)
            transform = T.Compose([T.Resize(resize, interpolation=own.interpolation, antialias=True),
                                   T.CenterCrop((h, w)), T.ToTensor(), T.Normalize(own.mean, own.std)])
            return transform, tuple(own.mean), tuple(own.std), (
                f"torchvision weights transforms: resize {resize} ({own.interpolation.value}), center crop {h}×{w}, "
                f"mean {list(own.mean)}, std {list(own.std)}")
    transform = T.Compose([T.Resize((h, w), antialias=True), T.ToTensor()])
    return transform, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (
        f"resize to {h}×{w}, scaled to [0, 1], not normalised (the model declares no preprocessing)")


def _config_text(cfg: dict) -> str:
    crop = cfg.get("crop_pct")
    return (f"input {tuple(cfg['input_size'])}, {cfg.get('interpolation')} interpolation, crop_pct {crop}, "
            f"crop_mode {cfg.get('crop_mode', 'center')}, mean {list(map(float, cfg['mean']))}, std {list(map(float, cfg['std']))}")


def load_images(files: list[Path], transform: Callable, mean: Any, std: Any) -> tuple[Any, list[Any]]:
    """(batch tensor, the un-normalised pixels each image became, (H, W, 3) in [0, 1])."""
    import torch
    from PIL import Image

    tensors = []
    for f in files:
        with Image.open(f) as im:
            tensors.append(transform(im.convert("RGB")))
    x = torch.stack(tensors)
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    pixels = (x * s + m).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return x, list(pixels)


# --------------------------------------------------------------------------- gates


def _sigmoid_like(module: Any) -> bool:
    return "sigmoid" in type(module).__name__.lower()


def _declared(module: Any) -> dict[str, tuple[str, str]] | None:
    """The ``GATES`` a zoo block declares for this module's class, if any."""
    from ..blocks import REGISTRY

    for info in REGISTRY.values():
        impl = info.impl()
        if isinstance(module, tuple(getattr(impl, "CLASSES", ()))) and getattr(impl, "GATES", None):
            return dict(impl.GATES)
    return None


def gates_of(module: Any) -> dict[str, tuple[str, str | None]]:
    """Where a module's gates are: its block's ``GATES``, else its sigmoid-like submodules
    (``gate``, ``scale_activation``), named by their path; kind None (read from the shape)."""
    declared = _declared(module)
    if declared:
        return {k: (p, kind) for k, (p, kind) in declared.items()}
    found = {n: (n, None) for n, m in module.named_modules() if n and _sigmoid_like(m)}
    return found


def find_gates(gm: Any, insertions: list[Any], base_gm: Any, notes: list[str]) -> list[Gate]:
    """The gates of every inserted module and of the model's own attention modules, in forward order."""
    from ..graph.attention import attention_regions

    gates: list[Gate] = []
    inserted = {i.module for i in insertions if i.attn != "none"}
    for ins in insertions:
        if ins.attn == "none":
            continue
        module = gm.get_submodule(ins.module)
        found = gates_of(module)
        if not found:
            notes.append(f"{ins.module} ({type(module).__name__}) declares no gate and has no sigmoid-like submodule: not read")
        for name, (path, kind) in found.items():
            gates.append(Gate(ins.module, name, f"{ins.module}.{path}", kind, "inserted", type(module).__name__))
    if base_gm is not None:
        for region in attention_regions(base_gm):
            if not region.gate or region.name in inserted:
                continue
            leaf = len(region.nodes) == 1 and next(iter(region.nodes)).op == "call_module"
            if leaf:
                module = gm.get_submodule(region.name)
                found = {k: (f"{region.name}.{p}", kind) for k, (p, kind) in gates_of(module).items()}
            else:  # traced through: the sigmoid-like modules its graph calls, the last one the gate
                calls = [n.target for n in region.nodes if n.op == "call_module" and _sigmoid_like(_get(gm, n.target))]
                order = {n: i for i, n in enumerate(base_gm.graph.nodes)}
                calls = [n.target for n in sorted((n for n in region.nodes if n.op == "call_module" and n.target in calls),
                                                  key=order.__getitem__)]
                found = {"gate": (calls[-1], None)} if calls else {}
            if not found:
                notes.append(f"the gate of {region.name} ({region.type}) is computed by a function, not a module: not read")
            for name, (path, kind) in found.items():
                gates.append(Gate(region.name, name, path, kind, "existing", region.type))
    return gates


def _get(gm: Any, path: str) -> Any:
    try:
        return gm.get_submodule(path)
    except AttributeError:
        return None


def read_gates(model: Any, gates: list[Gate], x: Any) -> dict[tuple[str, str], Any]:
    """One forward pass of ``model`` on ``x``; each gate's output, captured by a forward hook on its
    submodule ((N, ...) tensors; the last call where a submodule runs twice)."""
    import torch

    values: dict[tuple[str, str], Any] = {}
    handles = []
    for g in gates:
        sub = _get(model, g.path)
        if sub is None:
            continue

        def hook(_m: Any, _i: Any, out: Any, key: tuple[str, str] = (g.module, g.name)) -> None:
            values.pop(key, None)  # the last call counts; the dict keeps the order of the calls
            values[key] = out.detach().float().cpu()

        handles.append(sub.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    for g in gates:
        t = values.get((g.module, g.name))
        if t is not None and g.kind is None:
            g.kind = _kind(t)
    order = {key: i for i, key in enumerate(values)}
    gates.sort(key=lambda g: order.get((g.module, g.name), len(order)))  # forward order
    return values


def _kind(t: Any) -> str:
    spatial = t.shape[2:]
    if all(s == 1 for s in spatial):
        return "channel"
    if t.dim() >= 3 and t.shape[1] == 1:
        return "spatial"
    return "channel"  # (N, C, T, 1, 1): one gate per channel and frame


# --------------------------------------------------------------------------- Grad-CAM


def _in_layer(n: Any, name: str) -> bool:
    from ..graph.attention import _in_module

    return _in_module(n, name)


def layer_node(gm: Any, layer: str | None) -> Any:
    """The graph node whose output is ``layer``'s output (the last node of the module's forward that
    is read outside it), or by default the last node with a spatial (N, C, H, W) output."""
    from ..graph.shapes import _shape, layout_of

    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    if layer is None:
        for n in reversed(nodes):
            shape, layout = _shape(n), layout_of(n)
            if shape is not None and layout is not None and layout.name in ("NCHW", "NHWC") and \
                    shape[layout.spatial_axes[0]] * shape[layout.spatial_axes[1]] > 1:
                return n
        return None
    inside = [n for n in nodes if _in_layer(n, layer)]
    members = set(inside)
    outs = [n for n in inside if any(u not in members for u in n.users)]
    return outs[-1] if outs else None


def layer_name(n: Any) -> str:
    """The module a node belongs to, for titles: ``layer4.1.relu`` or the node's name."""
    if n.op == "call_module":
        return str(n.target)
    stack = n.meta.get("nn_module_stack") or {}
    if stack:
        last = list(stack.values())[-1]
        return last[0] if isinstance(last, tuple) else str(last)
    return n.name


def _tapped(gm: Any, node_name: str) -> Any:
    """A copy of ``gm``'s graph (same modules) with an identity module reading ``node_name``'s output:
    the layer Grad-CAM hooks."""
    import copy

    import torch

    graph = copy.deepcopy(gm.graph)
    target = next(n for n in graph.nodes if n.name == node_name)
    tapped = torch.fx.GraphModule(gm, graph)
    tapped.add_submodule(TAP, torch.nn.Identity())
    with graph.inserting_after(target):
        tap = graph.call_module(TAP, (target,))
    target.replace_all_uses_with(tap, delete_user_cb=lambda user: user is not tap)
    tapped.recompile()
    return tapped


def gradcam(gm: Any, node: Any, x: Any, classes: list[int]) -> Any:
    """pytorch-grad-cam's GradCAM of ``classes[i]`` for image ``i`` at ``node``'s output: (N, H, W) in [0, 1]."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from ..graph.shapes import layout_of

    layout = layout_of(node)
    reshape = None
    if layout is not None and layout.name == "NHWC":
        reshape = lambda t: t.permute(0, 3, 1, 2)  # noqa: E731  (channels to axis 1, as grad-cam expects)
    tapped = _tapped(gm, node.name)
    was_training = gm.training
    with GradCAM(model=tapped, target_layers=[getattr(tapped, TAP)], reshape_transform=reshape) as cam:
        maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(k) for k in classes])
    gm.train(was_training)
    return maps


def _check_layer_node(node: Any, layer: str | None, gm: Any, what: str) -> None:
    from ..graph.shapes import _shape, layout_of

    if node is None:
        if layer is None:
            raise AttnSurgeonError(f"the {what} model has no spatial (N, C, H, W) feature map for Grad-CAM")
        names = list(dict.fromkeys(str(n.target).split(".")[0] for n in gm.graph.nodes if n.op == "call_module"))
        raise AttnSurgeonError(f"--layer '{layer}' is no module the traced {what} model calls; name a module such as "
                               f"{', '.join(names[:10])} or a block in it (`attnsurgeon inspect MODEL` lists the blocks)")
    shape = _shape(node)
    layout = layout_of(node)
    spatial = [shape[a] for a in layout.spatial_axes] if layout is not None and shape is not None else []
    if shape is None or len(shape) != 4 or layout is None or layout.name not in ("NCHW", "NHWC") or spatial[0] * spatial[1] < 2:
        raise AttnSurgeonError(f"--layer '{layer or layer_name(node)}' has no spatial output (shape "
                               f"{tuple(shape) if shape else 'unknown'}): Grad-CAM needs an (N, C, H, W) feature map; "
                               "choose a convolutional stage or block")


# --------------------------------------------------------------------------- the whole run


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
    import torch

    from ..graph.inspect import inspect_model
    from ..loading.models import as_loaded, refuse_saved
    from ..graph.layout import resolve_input_size
    from ..rewriting.apply import apply_plan, make_spec

    say = progress or (lambda message: None)
    _require_gradcam()
    files = collect_images(images)  # before any model is built
    specs = list(plan or [])
    if attn is not None:
        specs.append(make_spec(attn, position, stages, blocks, init, replace=replace, **block_options))
    refuse_saved(model)
    say("Loading the model")
    loaded = as_loaded(model, pretrained=pretrained, weights=weights)
    size = resolve_input_size(input_size, loaded.input_size)
    if len(size) != 3 or size[0] != 3:
        raise AttnSurgeonError(f"explain reads RGB images: {loaded.spec} takes inputs of {tuple(size)}, not 3×H×W")
    say("Tracing")
    _, anatomy = inspect_model(loaded, input_size=size)
    if anatomy.target is not None:
        raise AttnSurgeonError(f"{loaded.spec} does not trace whole (only {', '.join(anatomy.target)}): explain needs a "
                               "classifier whose whole forward traces")
    base_gm = anatomy.gm
    base_gm.eval()
    modified, report = None, None
    if specs:
        say("Inserting")
        modified, report = apply_plan(loaded, specs, input_size=size)
        modified.eval()
    base_node = layer_node(base_gm, layer)
    _check_layer_node(base_node, layer, base_gm, "base")
    mod_node = None
    if modified is not None:
        mod_node = layer_node(modified, layer)
        _check_layer_node(mod_node, layer, modified, "modified")

    say(f"Reading {len(files)} image{'s' * (len(files) != 1)}")
    transform, mean, std, described = preprocessing(loaded, size)
    x, pixels = load_images(files, transform, mean, std)

    notes: list[str] = list(report.notes) if report else []
    if loaded.weights is None and loaded.source in ("torchvision", "timm"):  # a library model, built untrained
        notes.insert(0, f"{loaded.spec} has random weights (no --pretrained or --weights): its classes, probabilities "
                        "and Grad-CAM maps say nothing about the images")
    insertions = report.insertions if report else []
    say("Finding the gates")
    gates = find_gates(modified if modified is not None else base_gm, insertions, base_gm, notes)
    base_gates = find_gates(base_gm, [], base_gm, []) if modified is not None else gates

    views: dict[str, list[ModelView]] = {}
    classes: list[int] = []
    for name, gm, node, own_gates in (("base", base_gm, base_node, base_gates), ("modified", modified, mod_node, gates)):
        if gm is None:
            continue
        say(f"Running the {name} model")
        with torch.no_grad():
            logits = gm(x)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            raise AttnSurgeonError(f"explain needs a classifier: {loaded.spec} returns "
                                   f"{type(logits).__name__ if not isinstance(logits, torch.Tensor) else tuple(logits.shape)}, "
                                   "not one (N, classes) tensor of scores")
        if not classes:
            if class_index is not None and not 0 <= class_index < logits.shape[1]:
                raise AttnSurgeonError(f"--class {class_index} is out of range: {loaded.spec} has {logits.shape[1]} classes (0..{logits.shape[1] - 1})")
            classes = [class_index] * len(files) if class_index is not None else logits.argmax(1).tolist()
        probs = logits.float().softmax(1)
        top = probs.topk(min(5, probs.shape[1]), dim=1)
        values = read_gates(gm, own_gates, x)
        say(f"Grad-CAM of the {name} model at {layer or layer_name(node)}")
        cams = gradcam(gm, node, x, classes)
        views[name] = [ModelView(list(zip(top.indices[i].tolist(), top.values[i].tolist())), cams[i],
                                 {k: v[i] for k, v in values.items()}) for i in range(len(files))]
    for g in base_gates:  # the base's own attention, where there is a modified model, keeps its kind
        if g.kind is None:
            g.kind = "channel"
    out = Explanation(
        loaded.spec, loaded.source, tuple(size), [str(f) for f in files], pixels, classes,
        [_class_name(loaded, k) for k in classes], layer or layer_name(base_node), views["base"], views.get("modified"),
        gates if modified is not None else base_gates, described,
        [i.to_dict() for i in insertions], notes, class_index is not None, x, base_gm, modified,
    )
    return out


def _require_gradcam() -> None:
    import importlib.util

    if importlib.util.find_spec("pytorch_grad_cam") is None:
        raise AttnSurgeonError("explain computes Grad-CAM with the grad-cam package, which is not installed: "
                               "pip install 'attnsurgeon[explain]' (or pip install grad-cam)")


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


# --------------------------------------------------------------------------- figures and files


def write_explanation(e: Explanation, out: str | os.PathLike, *, force: bool = False,
                      progress: Callable[[str], None] | None = None) -> list[Path]:
    """One sheet per image (``sheet_<image>.png``), ``summary.png`` for several images and
    ``explain.json``, written into a temporary folder renamed onto ``out`` at the end."""
    from ..core.files import atomic_dir

    say = progress or (lambda message: None)
    names = _sheet_names(e.images)
    written = []
    with atomic_dir(out, force=force) as tmp:
        for i, name in enumerate(names):
            say(f"Drawing {name} ({i + 1}/{len(names)})")
            fig = draw_sheet(e, i)
            fig.savefig(tmp / name, format="png")
            written.append(name)
        if len(e.images) > 1:
            say("Drawing the summary")
            draw_summary(e).savefig(tmp / "summary.png", format="png")
            written.append("summary.png")
        data = e.to_dict()
        for entry, name in zip(data["images"], names):
            entry["sheet"] = name
        (tmp / "explain.json").write_text(json.dumps(data, indent=2) + "\n")
        written.append("explain.json")
    return [Path(out) / w for w in written]


def _sheet_names(images: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    names = []
    for image in images:
        stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(image).stem) or "image"
        seen[stem] = seen.get(stem, 0) + 1
        names.append(f"sheet_{stem}.png" if seen[stem] == 1 else f"sheet_{stem}_{seen[stem]}.png")
    return names


def _overlay(ax: Any, pixels: Any, heat: Any, title: str, cmap: str = "jet", alpha: float = 0.45) -> None:
    ax.imshow(pixels, interpolation="bilinear")
    ax.imshow(heat, cmap=cmap, alpha=alpha, vmin=0, vmax=1, interpolation="bilinear",
              extent=(-0.5, pixels.shape[1] - 0.5, pixels.shape[0] - 0.5, -0.5))
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def _upsample(t: Any, h: int, w: int) -> Any:
    import torch.nn.functional as F

    m = t.float().reshape(1, 1, *t.shape[-2:])
    return F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()


def _class_text(e: Explanation, view: ModelView, i: int) -> str:
    k = e.class_index[i]
    p = dict(view.top).get(k)
    name = f" {e.class_names[i]}" if e.class_names[i] else ""
    if p is None:
        import math

        p = math.nan
    return f"class {k}{name} (p={p:.2f})" if p == p else f"class {k}{name}"


def draw_sheet(e: Explanation, i: int) -> Any:
    """One image: the input, Grad-CAM of base and modified, channel gate strips, spatial gate maps."""
    import numpy as np
    from matplotlib.gridspec import GridSpec

    from .plot import new_figure, short_name

    views = e.views()
    shown = getattr(e, e.gate_view)[i]
    channel = [g for g in e.gates if g.kind != "spatial" and (g.module, g.name) in shown.gates]
    spatial = [g for g in e.gates if g.kind == "spatial" and (g.module, g.name) in shown.gates][:24]
    n_cols = 4
    spatial_rows = -(-len(spatial) // n_cols) if spatial else 0
    strip_h = min(0.16 * len(channel) + 0.6, 9.0) if channel else 0
    spacer = [0.25] if spatial else []  # room for the spatial section's heading
    heights = [2.6] + ([strip_h] if channel else []) + spacer + [1.9] * spatial_rows
    fig = new_figure(10.0, sum(heights) + 1.2 + 0.25 * bool(spatial), dpi=100)
    gs = GridSpec(len(heights), 1, figure=fig, height_ratios=heights, hspace=0.35,
                  top=1 - 0.85 / fig.get_figheight(), bottom=0.35 / fig.get_figheight(), left=0.15, right=0.95)
    top = gs[0].subgridspec(1, 1 + len(views), wspace=0.08)
    pixels = e.pixels[i]
    ax = fig.add_subplot(top[0, 0])
    ax.imshow(pixels)
    ax.set_title(Path(e.images[i]).name, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    for c, (name, vs) in enumerate(views.items()):
        ax = fig.add_subplot(top[0, c + 1])
        label = "base" if name == "base" else "modified: " + _what(e)
        _overlay(ax, pixels, vs[i].cam, f"{label}\nGrad-CAM, {_class_text(e, vs[i], i)}")
    model = e.model.split(":", 1)[-1]
    fig.suptitle(f"{model} — Grad-CAM at {e.layer}; gates of the {e.gate_view} model", fontsize=10,
                 y=1 - 0.12 / fig.get_figheight(), va="top")
    row = 1
    if channel:
        ax = fig.add_subplot(gs[row])
        row += 1
        vmax = max(1.0, max(float(shown.gates[(g.module, g.name)].max()) for g in channel))
        for r, g in enumerate(channel):
            t = shown.gates[(g.module, g.name)]
            values = np.sort(t.reshape(t.shape[0], -1).mean(-1).numpy() if t.dim() > 1 else t.numpy())[::-1]
            im = ax.imshow(values[None, :], aspect="auto", cmap="viridis", vmin=0, vmax=vmax,
                           extent=(0, 1, r + 0.5, r - 0.5), interpolation="nearest")
        ax.set_ylim(len(channel) - 0.5, -0.5)
        ax.set_xlim(0, 1)
        ax.set_yticks(range(len(channel)),
                      [f"{short_name(g.module, 22)}{'' if g.name in ('channel', 'gate') else ' · ' + g.name}"
                       f"{' (own)' if g.origin == 'existing' else ''}" for g in channel],
                      fontsize=max(4.5, min(7, 150 / len(channel))))
        ax.set_xticks([0, 0.5, 1], ["highest", "channels, sorted by gate value", "lowest"], fontsize=7)
        ax.set_title("channel gates (one strip per module, like SENet's excitation plots)", fontsize=8.5)
        bar = fig.colorbar(im, ax=ax, fraction=0.025, pad=0.01)
        bar.set_label("gate", fontsize=7)
        bar.ax.tick_params(labelsize=6.5)
    if spatial:
        row += 1  # the spacer
        sub = gs[row:].subgridspec(spatial_rows, n_cols, wspace=0.06, hspace=0.4)
        h, w = pixels.shape[:2]
        for k, g in enumerate(spatial):
            ax = fig.add_subplot(sub[k // n_cols, k % n_cols])
            if k == 0:
                top_y = ax.get_position().y1 + 0.42 / fig.get_figheight()
                fig.text(0.55, top_y, "spatial gates, upsampled over the image (each map scaled to its own range, in its title)",
                         ha="center", va="bottom", fontsize=8.5)
            t = shown.gates[(g.module, g.name)]
            heat = _upsample(t, h, w)
            lo, hi = float(heat.min()), float(heat.max())
            _overlay(ax, pixels, (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat),
                     f"{short_name(g.module, 24)}\n{g.name}: {lo:.2f}–{hi:.2f}", alpha=0.5)
        if len(e.gates) and len([g for g in e.gates if g.kind == "spatial"]) > len(spatial):
            fig.text(0.5, 0.005, f"first {len(spatial)} spatial gates shown; explain.json holds all", ha="center", fontsize=7)
    return fig


def _what(e: Explanation) -> str:
    kinds = sorted({f"{i['attn']} ({i['position']})" for i in e.insertions})
    return ", ".join(kinds) if len(kinds) <= 2 else f"{len(kinds)} insertions"


def draw_summary(e: Explanation) -> Any:
    """Across images: each gate's mean per image (one line per image), how much its values vary
    between images (SENet: early gates are shared across classes, late ones class-specific), and
    the last channel gate's value per channel for each image (SENet's excitation plots)."""
    from matplotlib.gridspec import GridSpec

    from .plot import new_figure, short_name

    summary = e.summary()[e.gate_view]
    shown = getattr(e, e.gate_view)
    fig = new_figure(max(8.0, 0.22 * len(summary) + 2.5), 8.2)
    if not summary:
        ax = fig.add_subplot(1, 1, 1)
        ax.axis("off")
        ax.text(0.5, 0.5, "no attention gate to read", ha="center", va="center")
        return fig
    gs = GridSpec(3, 1, figure=fig, height_ratios=[1, 1, 1.1], hspace=0.62)
    ax1 = fig.add_subplot(gs[0])
    ax2 = fig.add_subplot(gs[1], sharex=ax1)
    xs = range(len(summary))
    for i, view in enumerate(shown):
        means = [float(view.gates[(r["module"], r["gate"])].mean()) for r in summary]
        ax1.plot(xs, means, marker="o", ms=3, lw=1, alpha=0.8, label=Path(e.images[i]).name)
    ax1.set_ylabel("mean gate", fontsize=8)
    ax1.grid(alpha=0.3)
    ax1.tick_params(labelbottom=False)
    if len(shown) <= 10:
        ax1.legend(fontsize=6.5, ncol=min(5, len(shown)), loc="best", frameon=False)
    ax2.bar(xs, [r["std_across_images"] for r in summary], color="#4C72B0")
    ax2.set_ylabel("std across images\n(mean over channels)", fontsize=8)
    ax2.grid(axis="y", alpha=0.3)
    ax2.set_xticks(list(xs), [f"{short_name(r['module'], 18)}{'' if r['gate'] in ('channel', 'gate') else '·' + r['gate'][:2]}"
                              for r in summary], rotation=70, fontsize=max(4.5, min(7, 300 / len(summary))), ha="right")
    last = next((g for g in reversed(e.gates) if g.kind != "spatial" and all((g.module, g.name) in v.gates for v in shown)), None)
    ax3 = fig.add_subplot(gs[2])
    if last is not None:
        for i, view in enumerate(shown):
            t = view.gates[(last.module, last.name)]
            ax3.plot(t.reshape(t.shape[0], -1).mean(-1).numpy(), lw=0.9, alpha=0.8, label=Path(e.images[i]).name)
        ax3.set_xlabel(f"channel of {last.module} ({last.name} gate), in index order", fontsize=8)
        ax3.set_ylabel("gate", fontsize=8)
        ax3.grid(alpha=0.3)
    for ax in (ax1, ax2, ax3):
        ax.tick_params(labelsize=7)
    model = e.model.split(":", 1)[-1]
    fig.suptitle(f"{model}: gates of the {e.gate_view} model across {len(shown)} images", fontsize=10)
    fig.subplots_adjust(left=0.1, right=0.98, top=0.94, bottom=0.07)
    return fig
