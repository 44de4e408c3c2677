"""A block reference as text: its forms (:data:`FORMS`), its canonical spelling (a file's absolute
path), how tables name it, and the object it names, imported: a user's file (run once, and again
only when it changed), an installed module, or timm's attention factory.

:mod:`attnsurgeon.blocks.external` turns the object into a :class:`~attnsurgeon.blocks.BlockInfo`.
This module imports no torch.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from typing import Any

from ..core.errors import AttnSurgeonError, closest, one_line

TIMM_NAMES = (
    "se",
    "ese",
    "eca",
    "ecam",
    "ceca",
    "ge",
    "gc",
    "gca",
    "cbam",
    "lcbam",
    "coord",
    "scoord",
    "ela",
    "strip",
    "nl",
    "bat",
    "sk",
    "splat",
    "lambda",
    "bottleneck",
    "halo",
)  # what `timm:NAME` may name (timm's get_attn)
FORM_HELP = {  # the forms of a reference, each with an example: `list attn` and the docs show them
    "path/to/file.py:Class": "your own class in a Python file (imported, that is run): --attn my_gates.py:Gate",
    "package.module:Class": "a class of an installed library: --attn ultralytics.nn.modules.conv:CBAM",
    "timm:NAME": "a name of timm's attention factory (timm.layers.get_attn): --attn timm:eca",
}
FORMS = tuple(FORM_HELP)


def is_reference(name: Any) -> bool:
    """Whether ``name`` names a block by reference rather than by a zoo name."""
    return not isinstance(name, str) or ":" in name


def display_name(attn: str) -> str:
    """How tables and figures name a block: a zoo name as it is, ``timm:eca`` as it is, a class by
    reference by its class name (``/home/me/gate.py:Gate`` -> ``Gate``); JSON keeps the reference."""
    if not isinstance(attn, str) or ":" not in attn or attn.startswith("timm:"):
        return str(attn)
    return attn.rpartition(":")[2].split("@")[0].rpartition(".")[2]


def anchor_reference(ref: Any, folder: str | None) -> Any:
    """A file reference written in a recipe is relative to the recipe's folder: make it absolute
    there (when the file is there); anything else is returned as it is."""
    if not isinstance(ref, str) or folder is None or not is_file_ref(ref):
        return ref
    path, _, name = ref.rpartition(":")
    if os.path.isabs(path):
        return ref
    there = os.path.join(folder, path)
    return f"{os.path.abspath(there)}:{name}" if os.path.exists(there) else ref


def is_file_ref(ref: str) -> bool:
    path = ref.rpartition(":")[0]
    return path.endswith(".py") or "/" in path or os.sep in path


def absolute(ref: str) -> str:
    """A file reference with its file's absolute path (relative ones are the working folder's)."""
    if not is_file_ref(ref):
        return ref
    path, _, name = ref.rpartition(":")
    return f"{os.path.abspath(path)}:{name}"


def object_name(obj: Any) -> str:
    """``module:QualName`` where that imports the object again; else a name for this process only."""
    module, qual = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if module and qual and "<locals>" not in qual:
        return f"{module}:{qual}"
    return f"python:{qual or type(obj).__name__}@{id(obj):x}"


def import_target(ref: str) -> tuple[Any, str]:
    """The object a string reference names, and the reference's canonical spelling."""
    where, _, name = ref.rpartition(":")
    if not where or not name:
        raise AttnSurgeonError(f"'{ref}': a block reference is one of {', '.join(FORMS)}")
    if where == "timm":
        return timm_target(name), f"timm:{name}"
    if is_file_ref(ref):
        canonical = absolute(ref)
        module = import_file(canonical.rpartition(":")[0], where)
    else:
        if where.startswith("python") and "@" in name:
            raise AttnSurgeonError(
                f"'{ref}' was a class given in Python to another process (defined in a script or a "
                "function): it cannot be imported again; put it in a file and name it "
                "path/to/file.py:Class"
            )
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            hint = (
                " (a class defined in a script: put it in a file and name it path/to/file.py:Class)"
                if where == "__main__"
                else ""
            )
            raise AttnSurgeonError(f"'{ref}': cannot import module '{where}' ({one_line(exc)}){hint}") from None
        except Exception as exc:  # the module's own code failed
            raise AttnSurgeonError(f"'{ref}': importing module '{where}' failed: {one_line(exc)}") from None
        canonical = ref
    target: Any = module
    for part in name.split("."):
        if not hasattr(target, part):
            known = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
            near = closest(part, known)
            hint = (
                f"; did you mean {', '.join(near)}?"
                if near
                else (f"; it has {', '.join(sorted(known)[:8])}" if known else "")
            )
            raise AttnSurgeonError(f"'{ref}': {where} has no '{name}'{hint}")
        target = getattr(target, part)
    if not callable(target):
        raise AttnSurgeonError(f"'{ref}': {name} is a {type(target).__name__}, not a class or a factory of modules")
    return target, canonical


def stamp(path: str | None) -> int | None:
    """When a block file last changed (None: gone)."""
    try:
        return os.stat(path).st_mtime_ns if path else None
    except OSError:
        return None


def import_file(path: str, given: str) -> Any:
    """Import (run) a Python file the user named, under a name of its own; again only when it changed."""
    if not os.path.isfile(path):
        raise AttnSurgeonError(f"block file '{given}' does not exist (looked for {path})")
    name = (
        f"attnsurgeon_user.{os.path.splitext(os.path.basename(path))[0]}_{hashlib.sha1(path.encode()).hexdigest()[:8]}"
    )
    if name in sys.modules and getattr(sys.modules[name], "__stamp__", None) == stamp(path):
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise AttnSurgeonError(f"block file '{given}' is not a Python file")
    module = importlib.util.module_from_spec(spec)
    vars(module)["__stamp__"] = stamp(path)  # when it was run: import_file runs it again once it changed
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise AttnSurgeonError(f"importing block file '{given}' failed: {one_line(exc)}") from None
    return module


def timm_target(name: str) -> Any:
    try:
        from timm.layers import get_attn

        target = get_attn(name)
    except Exception:
        target = None
    if target is None:
        raise AttnSurgeonError(
            f"timm:{name}: timm's attention factory (timm.layers.get_attn) has no '{name}' "
            f"(it has {', '.join(TIMM_NAMES)})."
            + (f" Did you mean: {', '.join(closest(name, TIMM_NAMES))}?" if closest(name, TIMM_NAMES) else "")
        )
    return target
