"""Checks that an inserted module is on the live path of the model, not only registered in it.

Identity-initialised blocks give the base model's outputs whether or not the graph reads them, and
a parameter count sees a module added with ``add_submodule`` that nothing calls. Two checks tell a
wired block from one that is not, independently of the code under test:

* :func:`assert_each_is_read` adds a zero leaf tensor to each module's output (the values do not
  change) and back-propagates a fixed random projection of every output: a module whose output
  the model reads gets a non-zero gradient at that leaf; one whose output nothing reads (never
  called, or called and its result dropped) gets none. One forward and one backward pass check
  every inserted module at once, parameter-free ones (SimAM) included; the outputs of that forward
  pass are returned (``x + 0`` is ``x``), so a test compares them with the base model's for free.
* :func:`perturbed` adds noise to a module's weights, for a finite change of the outputs.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def flat_outputs(out) -> list[torch.Tensor]:
    """The floating-point tensors of a model's output, whatever its structure (dicts, lists, tuples)."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in flat_outputs(item)]
    return []


def assert_each_is_read(model: torch.nn.Module, modules, run, seed: int = 0):
    """Assert that the output of each module named in ``modules`` reaches the outputs of ``run()``
    (a call of ``model``); returns what ``run()`` returned, detached."""
    modules = list(modules)
    assert modules, "no inserted module to check"
    leaves: dict[str, torch.Tensor] = {}

    def probe(name):
        def hook(_module, _args, output):
            assert isinstance(output, torch.Tensor), (name, type(output))
            leaf = torch.zeros_like(output, requires_grad=True)
            leaves[name] = leaf
            return output + leaf

        return hook

    frozen = [p for p in model.parameters() if p.requires_grad]
    handles = [model.get_submodule(name).register_forward_hook(probe(name)) for name in modules]
    try:
        for p in frozen:  # gradients for the activations only: cheaper, and the model's .grad stay untouched
            p.requires_grad_(False)
        with torch.enable_grad():
            result = run()
            outputs = flat_outputs(result)
            generator = torch.Generator().manual_seed(seed)
            loss = sum((t * torch.randn(t.shape, generator=generator, dtype=t.dtype)).sum() for t in outputs)
            called = [name for name in modules if name in leaves]
            assert called == modules, f"never called: {sorted(set(modules) - set(called))}"
            assert loss.requires_grad, "no output depends on any inserted module"
            loss.backward()
    finally:
        for h in handles:
            h.remove()
        for p in frozen:
            p.requires_grad_(True)
    dead = [name for name, leaf in leaves.items() if leaf.grad is None or not leaf.grad.abs().sum() > 0]
    assert not dead, f"called but not read by the model (their outputs do not reach its outputs): {dead}"
    return _detached(result)


def _detached(out):
    if isinstance(out, torch.Tensor):
        return out.detach()
    if isinstance(out, dict):
        return type(out)((k, _detached(v)) for k, v in out.items())
    if isinstance(out, (list, tuple)):
        return type(out)(_detached(v) for v in out)
    return out


@contextmanager
def perturbed(model: torch.nn.Module, modules, scale: float = 0.5, seed: int = 0):
    """Within the block, every parameter of each module named in ``modules`` has Gaussian noise added."""
    generator = torch.Generator().manual_seed(seed)
    saved = {}
    with torch.no_grad():
        for name in modules:
            for pname, p in model.get_submodule(name).named_parameters():
                saved[(name, pname)] = p.detach().clone()
                p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for name in modules:
                for pname, p in model.get_submodule(name).named_parameters():
                    p.copy_(saved[(name, pname)])
