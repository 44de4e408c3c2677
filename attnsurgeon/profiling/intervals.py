"""How sure a latency difference is: the paired per-round ratio, its median and a 95 % interval (torch-free).

``profile`` times base and modified in alternating rounds, so each round gives one ratio
``modified / base`` measured under the same machine state: drift that slows both (another process,
the CPU's clock) cancels in the ratio. The estimate is the median of those ratios; the interval is
the distribution-free one for a median, from the order statistics of the ratios: with ``n`` rounds,
``[r(k), r(n+1-k)]`` for the largest ``k`` with ``P(Binomial(n, 1/2) < k) <= 2.5 %``. Its coverage is
at least 95 % for any continuous distribution of independent rounds (no normality, no bootstrap
resampling, which under-covers with the ten to thirty rounds a profile has), and it is deterministic.
Six rounds are the fewest that give one (then it spans all six ratios).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from math import comb

CONFIDENCE = 0.95
MIN_ROUNDS = 6  # the fewest rounds with a 95 % order-statistic interval: 1 - 2 / 2**6 = 0.969


@dataclass(frozen=True)
class RatioInterval:
    """The paired ratio ``modified / base``: its median over rounds and the interval around it."""

    median: float
    low: float | None  # None: too few rounds for an interval (under MIN_ROUNDS)
    high: float | None
    rounds: int
    confidence: float = CONFIDENCE

    def percent(self, inverse: bool = False) -> tuple[float, float | None, float | None]:
        """(change %, low %, high %) of the figure: latency (the ratio), or with ``inverse`` a rate
        such as throughput (1 / ratio, so the ends swap)."""

        def pct(r: float) -> float:
            return 100.0 * ((1.0 / r if inverse else r) - 1.0)

        lo, hi = (self.high, self.low) if inverse else (self.low, self.high)
        return pct(self.median), None if lo is None else pct(lo), None if hi is None else pct(hi)

    @property
    def resolved(self) -> bool:
        """Whether the interval excludes no difference (a ratio of 1)."""
        return self.low is not None and self.high is not None and (self.low > 1.0 or self.high < 1.0)

    @property
    def half_width(self) -> float | None:
        """The larger distance, in percent of the base, from the median to an end of the interval."""
        if self.low is None or self.high is None:
            return None
        return 100.0 * max(self.high - self.median, self.median - self.low)

    def to_dict(self, inverse: bool = False) -> dict:
        _, lo, hi = self.percent(inverse)
        return {
            "low": None if lo is None else round(lo, 4),
            "high": None if hi is None else round(hi, 4),
            "confidence": self.confidence,
            "rounds": self.rounds,
            "resolved": self.resolved,
        }


def order_statistic_ranks(n: int, confidence: float = CONFIDENCE) -> tuple[int, int] | None:
    """1-based ranks ``(k, n + 1 - k)`` of the interval for a median of ``n`` values, or None when
    even the whole range covers less than ``confidence``."""
    tail = (1.0 - confidence) / 2
    below = 0.0  # P(Binomial(n, 1/2) <= k - 1), growing with k
    best = None
    for k in range(1, n // 2 + 1):
        below += comb(n, k - 1) / 2**n
        if below > tail:
            break
        best = k
    return None if best is None else (best, n + 1 - best)


def ratio_interval(modified: list[float], base: list[float], confidence: float = CONFIDENCE) -> RatioInterval | None:
    """The paired interval of ``modified[i] / base[i]`` over rounds ``i``; None without rounds."""
    if len(modified) != len(base):
        raise ValueError(f"paired rounds differ in number: {len(modified)} and {len(base)}")
    ratios = sorted(m / b for m, b in zip(modified, base, strict=True) if b > 0)
    if not ratios:
        return None
    ranks = order_statistic_ranks(len(ratios), confidence)
    low, high = (ratios[ranks[0] - 1], ratios[ranks[1] - 1]) if ranks else (None, None)
    return RatioInterval(statistics.median(ratios), low, high, len(ratios), confidence)


def unresolved(low: float | None, high: float | None) -> bool:
    """Whether an interval of a change, in percent, contains no change (0): "no difference resolved"."""
    return low is not None and high is not None and low <= 0 <= high


def format_interval(change: float | None, low: float | None, high: float | None) -> str:
    """``+3.2% [+1.9, +4.6]``; ``+3.2% [too few rounds]`` without an interval."""
    if change is None:
        return "-"
    if low is None or high is None:
        return f"{change:+.1f}% [too few rounds]"
    return f"{change:+.1f}% [{low:+.1f}, {high:+.1f}]"
