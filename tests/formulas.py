"""Expected costs written out by hand from the papers' rules, as timm builds the blocks: a test compares
what attnsurgeon counts with these, never with a width or a count read back from attnsurgeon itself."""

import math


def make_divisible(v: float, divisor: int, min_value: int | None = None, round_limit: float = 0.0) -> int:
    """timm's channel rounding, written out: the nearest multiple of ``divisor`` (halves up), at least
    ``min_value`` (default ``divisor``), one step up where rounding lost more than ``1 - round_limit``."""
    min_value = min_value or divisor
    new = max(min_value, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < round_limit * v else new


def se_hidden(c: int, reduction: int = 16) -> int:
    """SE's bottleneck C/r, rounded to a multiple of 8 (timm's SEModule)."""
    return make_divisible(c / reduction, 8)


def cbam_hidden(c: int, reduction: int = 16) -> int:
    """CBAM's channel MLP C/r (timm's CbamModule: divisor 1)."""
    return make_divisible(c / reduction, 1)


def eca_kernel(c: int, gamma: int = 2, b: int = 1) -> int:
    """ECA's adaptive kernel k = |log2(C)/γ + b/γ|, made odd, at least 3."""
    t = int(abs(math.log2(c) + b) / gamma)
    return max(t if t % 2 else t + 1, 3)


def n_params(module) -> int:
    """The parameters ``module`` holds: the count a test compares a formula with."""
    return sum(p.numel() for p in module.parameters())


def se_params(c: int, hidden: int | None = None) -> int:
    """SE's two 1x1 convs with biases; ``hidden`` is timm's C/16 rounded to 8 unless given."""
    hidden = se_hidden(c) if hidden is None else hidden
    return c * hidden + hidden + hidden * c + c


def se_macs(c, h, w, hidden):
    # squeeze (mean), fc1, relu, fc2, sigmoid, broadcast multiply
    return c * h * w + c * hidden + hidden + hidden * c + c + c * h * w


def eca_macs(c, h, w, k):
    # mean, 1-D conv across channels, sigmoid, multiply
    return c * h * w + k * c + c + c * h * w


def cbam_macs(c, h, w, hidden, k=7):
    channel = 2 * c * h * w + 2 * (c * hidden + hidden + hidden * c) + c + c + c * h * w  # avg+max MLP, add, gate, mul
    spatial = 2 * c * h * w + 2 * k * k * h * w + 2 * h * w + h * w + c * h * w  # mean+amax over C, conv, BN, gate, mul
    return channel + spatial
