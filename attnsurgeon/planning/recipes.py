"""Recipes: a model, a list of insertions and optional profile settings, as data.

One schema serves the YAML files in ``recipes/`` (``attnsurgeon apply``) and the metadata of a
saved ``.safetensors`` model (``attnsurgeon.load``), so a saved model can be re-created from its
recipe::

    model: timm:resnet50
    model_args: {num_classes: 7}   # optional: the builder's arguments (--model-arg on the command line)
    weights: runs/model_best.pth.tar   # optional: a state dict or a training checkpoint (--weights), or pretrained
    weights_key: state_dict        # optional: the checkpoint's entry (--weights-key); by default EMA weights first
    input_size: [3, 224, 224]      # optional; [3, 16, 112, 112] for video, [1, 16000] for 1-D
    memory_efficient: true         # optional: recompute the inserted blocks in backward (attnsurgeon.rewriting.memory)
    target: backbone.body          # optional: the submodule(s) to rewrite (attnsurgeon.graph.parts)
    insertions:
      - attn: eca
        stages: [1, 2]
      - attn: cbam
        position: standard
        stages: [3, 4]
        options: {reduction: 16}
      - attn: se
        after: layer3.*.conv2      # or before: ...; globs over module names instead of a position (anchors)
    profile:                       # optional: settings for `apply --profile` and `sweep`
      batch_sizes: [1]

An insertion with ``replace: true`` takes the place of the attention gates the selected blocks
already have (``attn: none`` removes them); see :mod:`attnsurgeon.rewriting.surgery`.

A **sweep recipe** has, instead of ``insertions``, either ``configurations`` (a list of named
plans) or ``grid`` (lists of alternatives, expanded as their product)::

    model: timm:resnet50
    grid:
      attn: [se]
      options: {reduction: [2, 4, 8, 16, 32], bias: [false], rd_divisor: [1]}

A sweep recipe may name several models instead of one (``models: [timm:resnet*, convnext_tiny]``,
names or globs): a zoo sweep, every model under every configuration.

Validation names the place of every problem (``insertions[1].stages``, and the line in a YAML
file). YAML is read with a safe loader only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import AttnSurgeonError, one_line
from ..core.lists import split_list
from .schema import InsertionSpec, Where, is_int, no_unknown, parse_insertion, positive_ints, typed

RECIPE_KEYS = (
    "name",
    "description",
    "model",
    "models",
    "model_args",
    "model_kwargs",
    "weights",
    "weights_key",
    "input_size",
    "target",
    "insertions",
    "configurations",
    "grid",
    "profile",
    "memory_efficient",
)
CONFIGURATION_KEYS = ("name", "insertions")
GRID_KEYS = ("attn", "position", "after", "before", "stages", "blocks", "init", "options", "replace")
PROFILE_KEYS = (
    "device",
    "dtype",
    "batch_sizes",
    "mode",
    "threads",
    "channels_last",
    "compile",
    "min_run_time",
    "max_run_time",
    "target_ci",
)


@dataclass
class Configuration:
    """One row of a sweep: a name and the plan it applies."""

    name: str
    insertions: list[InsertionSpec]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "insertions": [s.to_dict() for s in self.insertions]}


@dataclass
class Recipe:
    model: str
    insertions: list[InsertionSpec]
    input_size: list[int] | None = None
    profile: dict[str, Any] | None = None
    name: str | None = None
    description: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    configurations: list[Configuration] | None = None  # a sweep recipe (from `configurations` or `grid`)
    target: list[str] | None = (
        None  # the submodules to rewrite (attnsurgeon.graph.parts); None: the whole model or found
    )
    models: list[str] | None = None  # a zoo sweep recipe's models (names or globs); ``model`` is then empty
    memory_efficient: bool = False  # recompute the inserted blocks (no insertions: the model's own gates) in backward
    weights: str | None = None  # where the base weights come from: a file, or "pretrained"; None: the builder's
    weights_key: str | None = None  # the checkpoint's entry the weights come from

    def load_args(self) -> dict[str, Any]:
        """The keyword arguments of :func:`attnsurgeon.load_model` that build the recipe's base model."""
        if self.weights == "pretrained":
            return {"pretrained": True, **self.model_kwargs}
        return {"weights": self.weights, "weights_key": self.weights_key, **self.model_kwargs}

    @property
    def is_sweep(self) -> bool:
        return self.configurations is not None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"models": self.models} if self.models else {"model": self.model}
        if self.configurations is not None:
            d["configurations"] = [c.to_dict() for c in self.configurations]
        else:
            d["insertions"] = [s.to_dict() for s in self.insertions]
        for key in ("name", "description", "input_size", "profile", "target"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        if self.model_kwargs:
            d["model_args"] = self.model_kwargs
        for key in ("weights", "weights_key"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        if self.memory_efficient:
            d["memory_efficient"] = True
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def parse_recipe(
    data: Any, source: str = "recipe", lines: dict[tuple, int] | None = None, folder: str | None = None
) -> Recipe:
    """Validate plain data (from YAML or JSON) into a :class:`Recipe`; errors name the place. Block
    files it names (``attn: gate.py:Gate``) are looked for in ``folder`` (the recipe's), then in the
    working folder."""
    where = Where(source, lines, folder)
    if not isinstance(data, dict):
        raise AttnSurgeonError(f"{where(())}: a recipe is a mapping with 'model' and 'insertions'")
    no_unknown(data, RECIPE_KEYS, (), where)
    kinds = [k for k in ("insertions", "configurations", "grid") if k in data]
    model, models = _parse_models(data, kinds, where)
    insertions, configurations = _parse_plan(data, kinds, where)
    input_size = _parse_input_size(data.get("input_size"), where)
    profile = _parse_profile(data.get("profile"), where)
    target = _parse_target(data.get("target"), where)
    kwargs = _parse_model_args(data, where)
    weights, weights_key = _parse_weights(data, where)
    memory_efficient = typed(data, "memory_efficient", bool, (), where) or False
    return Recipe(
        model,
        insertions,
        input_size,
        profile,
        typed(data, "name", str, (), where),
        typed(data, "description", str, (), where),
        dict(kwargs),
        configurations,
        target,
        models,
        memory_efficient,
        weights,
        weights_key,
    )


def _parse_models(data: dict, kinds: list[str], where: Where) -> tuple[str, list[str] | None]:
    """``(model, models)``: one model, or a zoo sweep's several (crossed with its configurations)."""
    if "models" not in data:
        return typed(data, "model", str, (), where, required=True), None
    if "model" in data:
        raise AttnSurgeonError(f"{where(('models',))}: give 'model' (one) or 'models' (a zoo sweep), not both")
    if kinds == ["insertions"]:
        raise AttnSurgeonError(
            f"{where(('models',))}: 'models' belongs to a sweep recipe (configurations or grid); "
            "a recipe with insertions has one 'model'"
        )
    models = split_list(data["models"]) if isinstance(data["models"], (str, list)) else data["models"]
    if not (isinstance(models, list) and models and all(isinstance(m, str) for m in models)):
        raise AttnSurgeonError(
            f"{where(('models',))}: expected a list of model names or globs ([timm:resnet*, convnext_tiny])"
        )
    return "", models


def _parse_plan(data: dict, kinds: list[str], where: Where) -> tuple[list[InsertionSpec], list[Configuration] | None]:
    """``(insertions, configurations)``: a recipe's insertions, or a sweep recipe's configurations
    (listed, or expanded from a grid), whichever one of the three the recipe gives."""
    if len(kinds) != 1:
        raise AttnSurgeonError(
            f"{where(())}: give exactly one of 'insertions' (a recipe), 'configurations' or 'grid' "
            f"(a sweep recipe){'; found ' + ', '.join(kinds) if kinds else ''}"
        )
    if kinds[0] == "insertions":
        return _parse_insertions(data["insertions"], ("insertions",), where, allow_empty=True), None
    if kinds[0] == "configurations":
        return [], _parse_configurations(data["configurations"], where)
    return [], _expand_grid(data["grid"], where)


def _parse_input_size(input_size: Any, where: Where) -> list[int] | None:
    if input_size is None:
        return None
    if isinstance(input_size, int):
        input_size = [input_size]
    if not (
        isinstance(input_size, list) and 1 <= len(input_size) <= 4 and all(is_int(v) and v > 0 for v in input_size)
    ):
        raise AttnSurgeonError(
            f"{where(('input_size',))}: expected a size (224), [H, W], [C, H, W], [C, T, H, W] "
            "or [C, L] of positive integers"
        )
    return input_size


def _parse_profile(profile: Any, where: Where) -> dict[str, Any] | None:
    if profile is not None:
        if not isinstance(profile, dict):
            raise AttnSurgeonError(f"{where(('profile',))}: expected a mapping of profile settings")
        no_unknown(profile, PROFILE_KEYS, ("profile",), where)
        _check_profile(profile, where)
    return profile


def _parse_target(target: Any, where: Where) -> list[str] | None:
    if target is None:
        return None
    items = [target] if isinstance(target, str) else target
    if not (isinstance(items, list) and items and all(isinstance(t, str) and t.strip() for t in items)):
        raise AttnSurgeonError(f"{where(('target',))}: expected a module path (backbone.body) or a list of them")
    return [t.strip() for t in items]


def _parse_model_args(data: dict, where: Where) -> dict[str, Any]:
    """The builder's arguments, under ``model_args`` or (in earlier saved files) ``model_kwargs``."""
    if "model_args" in data and "model_kwargs" in data:  # model_kwargs: how earlier saved files spell it
        raise AttnSurgeonError(
            f"{where(('model_kwargs',))}: give 'model_args' (model_kwargs is its older name), not both"
        )
    args_key = "model_kwargs" if "model_kwargs" in data else "model_args"
    kwargs = data.get(args_key) or {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) and k.isidentifier() for k in kwargs):
        raise AttnSurgeonError(
            f"{where((args_key,))}: expected a mapping of the builder's arguments ({{num_classes: 7}})"
        )
    return kwargs


def _parse_weights(data: dict, where: Where) -> tuple[str | None, str | None]:
    """``(weights, weights_key)``: a file or ``pretrained``, and the checkpoint entry (a file's only)."""
    weights = typed(data, "weights", str, (), where)
    weights_key = typed(data, "weights_key", str, (), where)
    if weights_key is not None and weights in (None, "pretrained"):
        raise AttnSurgeonError(
            f"{where(('weights_key',))}: chooses an entry of a 'weights' checkpoint file: give 'weights'"
        )
    return weights, weights_key


def _parse_insertions(raw: Any, path: tuple, where: Where, allow_empty: bool = False) -> list[InsertionSpec]:
    if not isinstance(raw, list) or (not raw and not allow_empty):
        raise AttnSurgeonError(f"{where(path)}: expected a {'' if allow_empty else 'non-empty '}list of insertions")
    return [parse_insertion(item, path + (i,), where) for i, item in enumerate(raw)]


def _parse_configurations(raw: Any, where: Where) -> list[Configuration]:
    if not isinstance(raw, list) or not raw:
        raise AttnSurgeonError(f"{where(('configurations',))}: expected a non-empty list of configurations")
    out: list[Configuration] = []
    for i, item in enumerate(raw):
        path = ("configurations", i)
        if not isinstance(item, dict):
            raise AttnSurgeonError(f"{where(path)}: a configuration is a mapping with 'name' and 'insertions'")
        no_unknown(item, CONFIGURATION_KEYS, path, where)
        name = typed(item, "name", str, path, where, required=True)
        if any(c.name == name for c in out):
            raise AttnSurgeonError(f"{where(path + ('name',))}: the name '{name}' is used twice")
        out.append(Configuration(name, _parse_insertions(item.get("insertions"), path + ("insertions",), where)))
    return out


def _expand_grid(raw: Any, where: Where) -> list[Configuration]:
    """The product of the grid's lists: each combination becomes one single-insertion configuration."""
    import itertools

    path = ("grid",)
    if not isinstance(raw, dict) or "attn" not in raw:
        raise AttnSurgeonError(f"{where(path)}: a grid is a mapping with at least 'attn' (lists of alternatives)")
    no_unknown(raw, GRID_KEYS, path, where)
    axes: list[tuple[tuple, list]] = []
    for key in ("attn", "position", "after", "before", "stages", "blocks", "init", "replace"):
        if key in raw:
            values = raw[key] if isinstance(raw[key], list) else [raw[key]]
            if not values:
                raise AttnSurgeonError(f"{where(path + (key,))}: an empty list leaves nothing to sweep")
            axes.append(((key,), values))
    options = raw.get("options") or {}
    if not isinstance(options, dict):
        raise AttnSurgeonError(f"{where(path + ('options',))}: expected a mapping of option -> list of alternatives")
    for key, values in options.items():
        axes.append((("options", key), values if isinstance(values, list) else [values]))
    out: list[Configuration] = []
    for combo in itertools.product(*(values for _, values in axes)):
        item: dict[str, Any] = {"options": {}}
        label = []
        for (key_path, _), value in zip(axes, combo, strict=True):  # one value per axis
            if key_path[0] == "options":
                item["options"][key_path[1]] = value
            else:
                item[key_path[0]] = value
            if len(dict(axes)[key_path]) > 1:  # name a configuration by what varies
                label.append(
                    f"{key_path[-1]}={_short(value)}"
                    if key_path[0] in ("options", "stages", "blocks", "after", "before")
                    else str(value)
                )
        spec = parse_insertion(item, path, where)
        out.append(Configuration("/".join(label) or spec.attn, [spec]))
    return out


def _short(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value).lower()


def _check_profile(profile: dict, where: Where) -> None:
    import re

    from .settings import DTYPES, MODES

    types: dict[str, type | tuple[type, ...]] = {
        "device": str,
        "dtype": str,
        "mode": str,
        "threads": int,
        "channels_last": bool,
        "compile": bool,
        "min_run_time": (int, float),
        "max_run_time": (int, float),
        "target_ci": (int, float),
    }
    for key, kind in types.items():
        if key in profile and (not isinstance(profile[key], kind) or (kind is int and isinstance(profile[key], bool))):
            raise AttnSurgeonError(
                f"{where(('profile', key))}: expected {getattr(kind, '__name__', 'a number')}, got {profile[key]!r}"
            )
    values = {
        "dtype": (lambda v: str(v).lower() in DTYPES, f"one of {', '.join(sorted(set(DTYPES.values())))}"),
        "mode": (lambda v: v in MODES, " or ".join(MODES)),
        "device": (
            lambda v: re.fullmatch(r"cpu|cuda(:\d+)?|mps", str(v).lower()) is not None,
            "cpu, cuda, cuda:N or mps",
        ),
        "threads": (lambda v: v >= 1, "≥ 1"),
        "min_run_time": (lambda v: v > 0, "> 0"),
        "max_run_time": (lambda v: v > 0, "> 0"),
        "target_ci": (lambda v: v > 0, "> 0 (percent)"),
    }
    for key, (ok, what) in values.items():
        if key in profile and not ok(profile[key]):
            raise AttnSurgeonError(f"{where(('profile', key))}: expected {what}, got {profile[key]!r}")
    if "batch_sizes" in profile:
        profile["batch_sizes"] = positive_ints(
            profile["batch_sizes"], where(("profile", "batch_sizes")), "positive integers"
        )


# --------------------------------------------------------------------------- YAML


def read_recipe(path: str | Path) -> Recipe:
    """Read and validate a YAML recipe (safe loader; errors carry the line)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise AttnSurgeonError(f"recipe '{path}' does not exist" + (" (it is a folder)" if p.is_dir() else ""))
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise AttnSurgeonError(f"'{path}' is not a text file: a recipe is YAML (see recipes/)") from None
    data, lines = load_yaml_with_lines(text, str(path))
    return parse_recipe(data, str(path), lines, str(p.resolve().parent))


def load_yaml_with_lines(text: str, source: str) -> tuple[Any, dict[tuple, int]]:
    """Parse YAML with the safe loader, and remember the line of every key and item."""
    import yaml

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or one_line(exc, with_type=False)
        raise AttnSurgeonError(f"{source}{where}: not valid YAML: {problem}") from None
    lines: dict[tuple, int] = {}
    constructor = yaml.SafeLoader("")

    plain = {"tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"}

    def walk(node: Any, path: tuple) -> Any:
        lines[path] = node.start_mark.line + 1
        if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) and node.tag not in plain:
            raise AttnSurgeonError(
                f"{source}, line {node.start_mark.line + 1}: the YAML tag {node.tag} is not allowed "
                "(a recipe is plain data)"
            )
        if isinstance(node, yaml.MappingNode):
            out = {}
            for key_node, value_node in node.value:
                key = constructor.construct_object(key_node, deep=True)
                if key in out:  # YAML would silently keep the last one
                    raise AttnSurgeonError(
                        f"{source}, line {key_node.start_mark.line + 1}: '{key}' is given twice "
                        f"(first on line {lines[path + (key,)]})"
                    )
                lines[path + (key,)] = key_node.start_mark.line + 1
                out[key] = walk(value_node, path + (key,))
                lines[path + (key,)] = key_node.start_mark.line + 1
            return out
        if isinstance(node, yaml.SequenceNode):
            return [walk(item, path + (i,)) for i, item in enumerate(node.value)]
        try:
            return constructor.construct_object(node, deep=True)
        except yaml.YAMLError as exc:  # a scalar with a tag the safe loader does not know
            raise AttnSurgeonError(
                f"{source}, line {node.start_mark.line + 1}: {one_line(exc, with_type=False)} (a recipe is plain data)"
            ) from exc

    data = walk(root, ()) if root is not None else None
    return data, lines
