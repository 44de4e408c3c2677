"""Weights files: a state dict, or a training checkpoint that holds one, read without running a pickle.

A file is ``.safetensors`` (tensors only), or a ``torch.save`` file (``.pt``, ``.pth``, ``.pth.tar``,
``.ckpt``, ``.bin``) read with ``torch.load(weights_only=True)``: tensors, numbers, strings and
containers, plus the harmless types of :data:`SAFE_GLOBALS` (timm's ``train.py`` keeps its
``argparse.Namespace`` in ``args``). A pickle of anything else is refused before it runs.

A checkpoint dict is searched for its weights in :data:`CHECKPOINT_KEYS` order, as timm's
``load_checkpoint`` does (the EMA weights first) and as Lightning and plain training loops write them;
``key`` chooses another. Names saved with a ``module.`` (DataParallel/DDP) or ``model.`` (a Lightning
module holding the model) prefix lose it when that is what makes them fit the model.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import AttnSurgeonError, few, one_line

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".pth.tar", ".ckpt", ".bin")
# where checkpoints keep their weights, the one taken first first (timm: EMA before raw)
CHECKPOINT_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model", "model_state_dict", "module")
PREFIXES = ("module.", "model.")  # DDP; a Lightning module's ``self.model``


def _safe_globals() -> list:
    """The non-tensor types a weights file may hold: ``argparse.Namespace`` (timm's ``args``)."""
    import argparse

    return [argparse.Namespace]


@dataclass
class Weights:
    """A state dict read from a file, and where in the file it was."""

    state: dict
    path: str
    key: str | None = None  # the checkpoint's entry taken; None: the file is the state dict itself
    others: list[str] = field(default_factory=list)  # the checkpoint's other entries that hold weights
    stripped: str | None = None  # the prefix taken off the names to fit the model (``module.``)

    @property
    def note(self) -> str | None:
        """What a report says about where the weights came from; None for a plain state dict."""
        if self.key is None and self.stripped is None:
            return None
        parts = []
        if self.key is not None:
            ema = " (the EMA weights)" if "ema" in self.key else ""
            other = f"; --weights-key {self.others[0]} takes the file's '{self.others[0]}'" if self.others else ""
            parts.append(f"weights: '{self.key}'{ema} of {Path(self.path).name}{other}")
        if self.stripped is not None:
            parts.append(f"the '{self.stripped}' prefix was taken off the saved names to fit the model")
        return "; ".join(parts)


def weights_suffix(path: str | os.PathLike) -> str:
    """The extension that says the format (``.pth.tar`` is one)."""
    name = Path(path).name.lower()
    return next((s for s in sorted(WEIGHT_SUFFIXES, key=len, reverse=True) if name.endswith(s)), Path(path).suffix)


def check_weights_path(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        raise AttnSurgeonError(f"weights file '{path}' is a folder, not a file")
    if not p.is_file():
        raise AttnSurgeonError(f"weights file '{path}' does not exist")
    if weights_suffix(p) not in WEIGHT_SUFFIXES:
        raise AttnSurgeonError(
            f"weights file '{path}': unknown extension '{p.suffix}' (expected {', '.join(WEIGHT_SUFFIXES)})"
        )
    return p


def read_weights(path: str | os.PathLike, key: str | None = None) -> Weights:
    """The state dict in a weights file: the file itself, or the entry of a checkpoint dict."""
    obj = _read_file(path)
    return _find_state_dict(obj, str(path), key)


def read_state_dict(path: str | os.PathLike, key: str | None = None) -> dict:
    """A state dict, read safely: safetensors, or ``torch.load(weights_only=True)``."""
    return read_weights(path, key).state


def _read_file(path: str | os.PathLike) -> Any:
    import torch

    p = check_weights_path(path)
    if weights_suffix(p) == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(p)))
        except (SafetensorError, OSError, ValueError) as exc:
            raise AttnSurgeonError(f"'{path}' is not a readable safetensors file: {one_line(exc)}") from exc
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)
        # torch names the offending global; junk bytes fail with "Unsupported operand" instead
        if "Unsupported global" in text or "was not an allowed global" in text:
            raise AttnSurgeonError(
                f"refused to load '{path}': it holds Python objects other than tensors"
                + _culprits(p, text)
                + ", and unpickling them could run code. Save a plain state dict "
                "(torch.save(model.state_dict(), f)) or use .safetensors."
            ) from exc
        # torch's own message advises weights_only=False, i.e. running the pickle: not our advice
        reason = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        detail = reason.group(1).strip() if reason else f"{type(exc).__name__}"
        raise AttnSurgeonError(
            f"'{path}' is not a PyTorch weights file (a state dict saved with torch.save): {detail}"
        ) from exc


def _culprits(path: Path, text: str) -> str:
    """`` (the.Class, ...)``: the types the file would build, read from the pickle without running it."""
    import torch

    allowed = {f"{t.__module__}.{t.__qualname__}" for t in _safe_globals()}
    try:
        names = [n for n in torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) if n not in allowed]
    except Exception:  # an older torch, or a file it cannot list: the name in torch's message
        found = re.search(r"GLOBAL ([\w.]+)", text)
        names = [found.group(1)] if found else []
    return f" ({', '.join(names)})" if names else ""


def _is_state_dict(obj: Any) -> bool:
    import torch

    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _find_state_dict(obj: Any, path: str, key: str | None) -> Weights:
    if not isinstance(obj, Mapping):
        raise AttnSurgeonError(f"'{path}' does not hold a state dict (a mapping of names to tensors)")
    held = [k for k, v in obj.items() if isinstance(k, str) and _is_state_dict(v)]
    if key is not None:
        if key not in obj:
            raise AttnSurgeonError(
                f"'{path}' has no entry '{key}' (--weights-key); "
                + (
                    f"its weights are under {', '.join(map(repr, held))}"
                    if held
                    else "it is a state dict itself: drop --weights-key"
                )
            )
        if not _is_state_dict(obj[key]):
            raise AttnSurgeonError(
                f"'{key}' in '{path}' is not a state dict (a mapping of names to tensors)"
                + (f"; its weights are under {', '.join(map(repr, held))}" if held else "")
            )
        return Weights(dict(obj[key]), path, key, [k for k in held if k != key])
    if _is_state_dict(obj):
        return Weights(dict(obj), path)
    found = next((k for k in CHECKPOINT_KEYS if k in held), None)
    if found is None:
        entries = ", ".join(map(repr, list(obj)[:8]))
        raise AttnSurgeonError(
            f"'{path}' does not hold a state dict (a mapping of names to tensors): it is a dict of "
            f"{entries}" + (f"; choose one with --weights-key ({', '.join(held)})" if held else "")
        )
    return Weights(dict(obj[found]), path, found, [k for k in held if k != found])


def fit_names(own: Mapping[str, Any], weights: Weights) -> Weights:
    """Take a ``module.``/``model.`` prefix off the saved names where that makes more of them fit
    ``own`` (the model's state dict); otherwise the names as saved."""
    best, best_hits = None, sum(k in own for k in weights.state)
    for prefix in PREFIXES:
        kept = {k[len(prefix) :]: v for k, v in weights.state.items() if k.startswith(prefix)}
        hits = sum(k in own for k in kept)
        if hits > best_hits:
            best, best_hits = prefix, hits
    if best is not None:
        weights.state = {k[len(best) :]: v for k, v in weights.state.items() if k.startswith(best)}
        weights.stripped = best
        return fit_names(own, weights) if any(k.startswith(PREFIXES) for k in weights.state) else weights
    return weights


def load_weights(
    model: Any, path: str | os.PathLike, key: str | None = None, classes_arg: str | None = None
) -> Weights:
    """Load a weights file into ``model`` strictly; mismatches are an error that lists them (and,
    where only the classifier's size differs, names ``classes_arg``, the builder argument that fits it)."""
    weights = fit_names(model.state_dict(), read_weights(path, key))
    where = f"'{weights.key}' of {path}" if weights.key else str(path)
    check_state_dict(model, weights.state, where, classes_arg)
    model.load_state_dict(weights.state, strict=True)
    return weights


def check_state_dict(model: Any, state: Mapping[str, Any], what: str, classes_arg: str | None = None) -> None:
    """Raise, listing them, if ``state`` has missing, unexpected or wrongly shaped tensors."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {few(missing, 8)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {few(unexpected, 8)}")
    if wrong:
        shapes = [f"{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})" for k in wrong]
        problems.append(f"shape mismatches ({len(wrong)}): {few(shapes, 8)}")
    if problems:
        hint = (
            ""
            if missing or unexpected
            else _classes_hint({k: (state[k].shape, own[k].shape) for k in wrong}, classes_arg)
        )
        raise AttnSurgeonError(f"weights in {what} do not fit the model: " + "; ".join(problems) + hint)


def _classes_hint(shapes: dict[str, tuple], classes_arg: str | None) -> str:
    """Where every mismatch is the output size of the same layers (file N, model M), the model was
    built for another number of classes: say which argument builds it with the file's."""
    if not all(len(f) == len(m) >= 1 and tuple(f)[1:] == tuple(m)[1:] for f, m in shapes.values()):
        return ""
    pairs = {(tuple(f)[0], tuple(m)[0]) for f, m in shapes.values()}
    if len(pairs) != 1:
        return ""
    ((n_file, n_model),) = pairs
    fix = (
        f"build the model with --model-arg {classes_arg}={n_file} ({classes_arg}={n_file} in Python, "
        f"model_args: {{{classes_arg}: {n_file}}} in a recipe)"
        if classes_arg
        else f"build the model with {n_file} classes"
    )
    return f". The file's classifier has {n_file} outputs and the model's {n_model}: {fix}"
