"""A gate's product whose backward reads the norm's input (attnsurgeon.rewriting.gate_product).

The reference is plain autograd through ``BN(z) * s``, in float64 (where the two sums agree to
rounding) and in float32 against float64 (where the fused sum must be as close to exact as the
plain product's)."""

import pytest
import torch

from attnsurgeon.rewriting import gate_product
from attnsurgeon.rewriting.gate_product import GateProduct


def _case(shape, gate_shape, dtype, affine=True, seed=0):
    """A norm's input ``z`` (offset, so that a centring error would show), its batch statistics, the norm's
    output ``x`` and a gate ``s``."""
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    z = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 3).to(dtype)
    axes = (0,) + tuple(range(2, len(shape)))
    mean = z.mean(axes)
    invstd = (z.var(axes, unbiased=False) + 1e-5).rsqrt()
    weight = torch.randn(c, generator=g, dtype=dtype) if affine else None
    bias = torch.randn(c, generator=g, dtype=dtype) if affine else None
    view = (-1,) + (1,) * (len(shape) - 2)
    scale = invstd if weight is None else invstd * weight
    shift = -mean * scale if bias is None else bias - mean * scale
    x = (z * scale.view(view) + shift.view(view)).requires_grad_()
    s = torch.rand(gate_shape, generator=g, dtype=dtype).requires_grad_()
    grad = torch.randn(shape, generator=g, dtype=dtype)
    return x, s, (z, mean, invstd, weight, bias), grad


def _grads(x, s, y, grad):
    return torch.autograd.grad(y, (x, s), grad)


SHAPES = [
    ((3, 5, 4, 6), (3, 5, 1, 1)),  # SE, ECA: a number per sample and channel
    ((3, 5, 4, 6), (1, 5, 1, 1)),  # one gate for the batch
    ((3, 5, 4, 6), (5, 1, 1)),  # broadcast from the right
    ((3, 5, 4, 6), (3, 1, 1, 1)),  # a number per sample
    ((2, 4, 7), (2, 4, 1)),  # 1-D maps
    ((2, 4, 3, 2, 5), (2, 4, 1, 1, 1)),  # 3-D maps
]


@pytest.mark.parametrize("shape, gate_shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_the_gradients_are_the_products_in_float64(shape, gate_shape, affine):
    x, s, norm, grad = _case(shape, gate_shape, torch.float64, affine)
    assert gate_product.applies(x, s, norm[0], norm[1])
    y = GateProduct.apply(x, s, lambda g: gate_product.norm_gradient(g, *norm))
    expected_y = x * s
    assert torch.equal(y, expected_y) and torch.equal(y, s * x)
    gx, gs = _grads(x, s, y, grad)
    ex, es = _grads(x, s, expected_y, grad)
    assert torch.equal(gx, ex)  # g·s, as the product's own backward
    assert gs.shape == s.shape and torch.allclose(gs, es, rtol=1e-12, atol=1e-12)


def test_in_float32_the_gate_gradient_is_as_close_to_exact_as_the_plain_products():
    x, s, norm, grad = _case((8, 64, 28, 28), (8, 64, 1, 1), torch.float32)
    x64, s64 = (t.detach().double().requires_grad_() for t in (x, s))
    exact = _grads(x64, s64, x64 * s64, grad.double())[1]
    plain = _grads(x, s, x * s, grad)[1]
    fused = _grads(x, s, GateProduct.apply(x, s, lambda g: gate_product.norm_gradient(g, *norm)), grad)[1]
    off_plain, off_fused = ((t.double() - exact).abs().max() for t in (plain, fused))
    assert off_fused <= 2 * off_plain
    assert off_fused <= 1e-5 * exact.abs().max()


def test_only_a_gate_along_batch_and_channels_of_a_contiguous_float32_map_applies():
    x, s, norm, _ = _case((2, 4, 5, 5), (2, 4, 1, 1), torch.float32)
    z, mean = norm[0], norm[1]
    assert gate_product.applies(x, s, z, mean)
    spatial = torch.rand(2, 1, 5, 5, requires_grad=True)  # a spatial gate's map: Σ over channels, not over positions
    assert not gate_product.applies(x, spatial, z, mean)
    assert not gate_product.applies(x, s, z.to(memory_format=torch.channels_last), mean)  # not N·C rows
    assert not gate_product.applies(x, s.detach(), z, mean)  # no gradient to take
    assert not gate_product.applies(x.bfloat16(), s.bfloat16(), z.bfloat16(), mean)  # autocast: rebuilt as before
    with torch.no_grad():
        assert not gate_product.applies(x, s, z, mean)


def test_what_the_gradient_reads_is_let_go_when_the_backward_has_run():
    """The node outlives its backward (the graph lives as long as the output); the function that takes the
    gate's gradient holds the plan's records (the norm's input, a map) and must not keep them to the end of the
    backward pass: it is dropped once used, as autograd drops saved tensors."""
    import gc
    import weakref

    x, s, norm, grad = _case((2, 4, 5, 5), (2, 4, 1, 1), torch.float32)

    class Records:  # stands for the plan's run
        def gradient(self, g):
            return gate_product.norm_gradient(g, *norm)

    records = Records()
    alive = weakref.ref(records)
    y = GateProduct.apply(x, s, records.gradient)
    del records
    gc.collect()
    assert alive() is not None  # held for the backward pass
    y.backward(grad)
    gc.collect()
    assert alive() is None and y.grad_fn is not None
