"""Grad-CAM for ``attnsurgeon explain``: the layer to explain (the last spatial feature map, or the
one named), an identity tap at that layer on a copy of the traced graph, and the class-activation
maps computed there by the ``grad-cam`` library (``pytorch_grad_cam.GradCAM``).
"""

from __future__ import annotations

from typing import Any

from ..core.errors import AttnSurgeonError

TAP = "attnsurgeon_cam_tap"


def _in_layer(n: Any, name: str) -> bool:
    from ..graph.attention import in_module

    return in_module(n, name)


def layer_node(gm: Any, layer: str | None) -> Any:
    """The graph node whose output is ``layer``'s output (the last node of the module's forward that
    is read outside it), or by default the last node with a spatial (N, C, H, W) output."""
    from ..graph.shapes import layout_of, shape_of

    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    if layer is None:
        for n in reversed(nodes):
            shape, layout = shape_of(n), layout_of(n)
            if (
                shape is not None
                and layout is not None
                and layout.name in ("NCHW", "NHWC")
                and shape[layout.spatial_axes[0]] * shape[layout.spatial_axes[1]] > 1
            ):
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
    from ..graph.shapes import layout_of, shape_of

    if node is None:
        if layer is None:
            raise AttnSurgeonError(f"the {what} model has no spatial (N, C, H, W) feature map for Grad-CAM")
        names = list(dict.fromkeys(str(n.target).split(".")[0] for n in gm.graph.nodes if n.op == "call_module"))
        raise AttnSurgeonError(
            f"--layer '{layer}' is no module the traced {what} model calls; name a module such as "
            f"{', '.join(names[:10])} or a block in it (`attnsurgeon inspect MODEL` lists the blocks)"
        )
    shape = shape_of(node)
    layout = layout_of(node)
    spatial = [shape[a] for a in layout.spatial_axes] if layout is not None and shape is not None else []
    if (
        shape is None
        or len(shape) != 4
        or layout is None
        or layout.name not in ("NCHW", "NHWC")
        or spatial[0] * spatial[1] < 2
    ):
        raise AttnSurgeonError(
            f"--layer '{layer or layer_name(node)}' has no spatial output (shape "
            f"{tuple(shape) if shape else 'unknown'}): Grad-CAM needs an (N, C, H, W) feature map; "
            "choose a convolutional stage or block"
        )


# --------------------------------------------------------------------------- the whole run


def _require_gradcam() -> None:
    import importlib.util

    if importlib.util.find_spec("pytorch_grad_cam") is None:
        raise AttnSurgeonError(
            "explain computes Grad-CAM with the grad-cam package, which is not installed: "
            "pip install 'attnsurgeon[explain]' (or pip install grad-cam)"
        )
