"""Libraries whose models are named by a prefix: ``yolo:``, ``hf:``, ``smp:``.

Each library is one module here with the same five names, read by :mod:`attnsurgeon.loading.models`
through :data:`INTEGRATIONS` (a new library is one module plus one line):

* ``LIBRARY`` (the import name, checked before anything is built) and ``EXTRA`` (the
  ``pip install 'attnsurgeon[EXTRA]'`` that installs it);
* ``names()``: the names ``attnsurgeon list models`` shows (without the prefix);
* ``check(name)``: an unknown name is an error with the close names, before any model is built;
* ``build(name, pretrained, kwargs)``: the model, built offline from the library's own config unless
  ``pretrained`` asks for published weights (the local cache first, then the network, failing in
  seconds when neither has them);
* ``input_size(model, name)``: the sample input the library's config says the model takes;
* optionally ``is_local(name)``: whether the name is a file or folder (``yolo:runs/best.pt``,
  ``hf:./model``); such a name is recorded by its absolute path, so that a saved recipe finds it
  from anywhere.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from types import ModuleType

from ...core.errors import AttnSurgeonError


@dataclass(frozen=True)
class Integration:
    prefix: str  # yolo, hf, smp: how a spec names the source (``yolo:yolov8n``)
    source: str  # the source a report names
    module: str  # the attnsurgeon module with the hooks
    library: str  # the import name of the library
    extra: str  # the optional dependency group that installs it
    # The library's model base class (``module.Class``) where a rewritten model must keep its class:
    # its forward does more than a call with one input shows (a Hugging Face model computes the loss
    # from ``labels``; ultralytics' serves predict, val and its trainer). Such models are traced in
    # parts (their blocks' containers), never whole, whichever way they were built.
    keep_class: str | None = None
    classes_arg: str | None = None  # the builder argument that sets the number of classes (``nc``)

    def load(self, spec: str = "") -> ModuleType:
        """The hooks module; the library missing is a one-line error naming the extra."""
        if importlib.util.find_spec(self.library) is None:
            raise AttnSurgeonError(
                f"'{spec or self.prefix + ':'}' needs {self.library}, which is not installed: "
                f"pip install 'attnsurgeon[{self.extra}]'"
            )
        return importlib.import_module(self.module)

    @property
    def installed(self) -> bool:
        return importlib.util.find_spec(self.library) is not None


INTEGRATIONS = {
    "yolo": Integration(
        "yolo",
        "ultralytics",
        "attnsurgeon.loading.sources.yolo",
        "ultralytics",
        "yolo",
        "ultralytics.nn.tasks.BaseModel",
        classes_arg="nc",
    ),
    "hf": Integration(
        "hf",
        "huggingface",
        "attnsurgeon.loading.sources.hf",
        "transformers",
        "hf",
        "transformers.modeling_utils.PreTrainedModel",
        classes_arg="num_labels",
    ),
    "smp": Integration(
        "smp", "smp", "attnsurgeon.loading.sources.smp", "segmentation_models_pytorch", "smp", classes_arg="classes"
    ),
}
BY_SOURCE = {i.source: i for i in INTEGRATIONS.values()}


def keeps_class(model: object) -> bool:
    """A model of a library whose models keep their class through the surgery (traced in parts)."""
    bases = {f"{c.__module__}.{c.__qualname__}" for c in type(model).__mro__}
    return any(i.keep_class in bases for i in INTEGRATIONS.values() if i.keep_class)
