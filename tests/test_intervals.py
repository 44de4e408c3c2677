"""The interval of a latency difference, on synthetic timings with a known ratio (a fake clock that
measure_latency calls instead of running models): coverage, "no difference resolved" for identical
models, --target-ci. No test here times anything."""

import json
import math
import random

import pytest

from attnsurgeon.planning.settings import Settings
from attnsurgeon.profiling import measure
from attnsurgeon.profiling.intervals import MIN_ROUNDS, format_interval, order_statistic_ranks, ratio_interval
from attnsurgeon.profiling.measure import measure_latency


def binomial_below(n: int, k: int) -> float:
    """P(Binomial(n, 1/2) < k), summed here independently of the module."""
    return sum(math.comb(n, i) for i in range(k)) / 2**n


@pytest.mark.parametrize("n", range(1, 41))
def test_ranks_are_the_narrowest_with_95_percent_coverage(n):
    ranks = order_statistic_ranks(n)
    if n < MIN_ROUNDS:
        assert ranks is None and 1 - 2 * binomial_below(n, 1) < 0.95  # even the whole range covers too little
        return
    k, upper = ranks
    assert upper == n + 1 - k
    assert 1 - 2 * binomial_below(n, k) >= 0.95  # coverage of [x(k), x(n+1-k)]
    assert 1 - 2 * binomial_below(n, k + 1) < 0.95  # one rank further in would not cover


def test_the_interval_reads_the_sorted_ratios():
    base = [10.0] * 10
    mod = [10.0 * r for r in (1.05, 1.01, 1.02, 1.03, 1.04, 1.06, 1.07, 1.08, 1.09, 1.10)]
    r = ratio_interval(mod, base)
    assert (r.rounds, round(r.low, 6), round(r.high, 6), round(r.median, 6)) == (10, 1.02, 1.09, 1.055)
    assert r.resolved and r.percent() == pytest.approx((5.5, 2.0, 9.0))
    change, low, high = r.percent(inverse=True)  # throughput: 1 / ratio, ends swapped
    assert change == pytest.approx(100 * (1 / 1.055 - 1)) and low == pytest.approx(100 * (1 / 1.09 - 1))
    assert high == pytest.approx(100 * (1 / 1.02 - 1))
    assert ratio_interval([1.0] * 5, [1.0] * 5).low is None  # five rounds: too few
    assert format_interval(3.21, 1.94, 4.55) == "+3.2% [+1.9, +4.5]"


class FakeMachine:
    """Per-call times of two models, ``ratio`` apart, on a machine whose speed drifts (a random walk
    shared by whatever runs next, with bursts of other work) plus each call's own noise."""

    def __init__(self, ratio: float, seed: int, base_s: float = 0.01):
        self.rng = random.Random(seed)
        self.times = {"base": base_s, "modified": base_s * ratio}
        self.drift = 0.0

    def clock(self, step, calls: int) -> float:
        self.drift += self.rng.gauss(0, 0.02)
        burst = 1.5 if self.rng.random() < 0.1 else 1.0  # another process for a moment
        noise = sum(math.exp(self.rng.gauss(0, 0.03)) for _ in range(calls)) / calls
        return self.times[step] * math.exp(self.drift) * burst * noise


SETTINGS = Settings(min_run_time=0.2, max_run_time=1.0)  # 10 ms calls: ten or more rounds of two calls


def run(ratio: float, seed: int, settings: Settings = SETTINGS):
    machine = FakeMachine(ratio, seed)
    return measure_latency({"base": "base", "modified": "modified"}, 1, settings, clock=machine.clock)


@pytest.mark.parametrize("target_ci", [None, 2.0])
def test_the_interval_covers_a_known_3_percent_difference(target_ci):
    """95 % nominal, over 300 simulated runs; with --target-ci 2 too (the timing stops on the interval's width,
    which must not cost it its coverage), and then the 3 % is told from none in nearly every run."""
    settings = Settings(min_run_time=0.2, max_run_time=20.0 if target_ci else 1.0, target_ci=target_ci)
    covered, resolved = 0, 0
    trials = 300
    for seed in range(trials):
        interval = run(1.03, seed, settings)["modified"].vs_base
        assert interval.rounds >= 10 and interval.low is not None
        covered += interval.low <= 1.03 <= interval.high
        resolved += interval.resolved
    assert covered / trials >= 0.93
    if target_ci:
        assert resolved / trials >= 0.9


def test_identical_models_give_no_difference_resolved_in_95_percent_of_runs():
    unresolved = sum(not run(1.0, seed)["modified"].vs_base.resolved for seed in range(300))
    assert unresolved / 300 >= 0.93


def test_pooled_medians_alone_would_not_say_so():
    """Why the interval: on this machine the ratio of the two pooled medians strays past ±3 % for identical models."""
    strays = 0
    for seed in range(100):
        lat = run(1.0, seed)
        strays += abs(lat["modified"].median_ms / lat["base"].median_ms - 1) > 0.03
    assert strays > 0


def test_target_ci_times_until_the_interval_is_that_narrow():
    loose = run(1.03, 7)
    tight = run(1.03, 7, Settings(min_run_time=0.2, max_run_time=20.0, target_ci=1.0))
    assert tight["base"].runs > loose["base"].runs
    assert tight["modified"].vs_base.half_width <= 1.0
    capped = run(1.03, 7, Settings(min_run_time=0.2, max_run_time=0.5, target_ci=0.01))  # unreachable: stops at max
    assert sum(capped["base"].rounds_ms) * capped["base"].calls / 1000 < 0.5 + 0.1
    slow = measure_latency(
        {"base": "base", "modified": "modified"},
        1,
        Settings(min_run_time=0.1, max_run_time=0.5),
        clock=FakeMachine(1.03, 7, base_s=1.0).clock,
    )  # 1 s a call, 0.5 s allowed
    assert (
        slow["base"].runs == MIN_ROUNDS and slow["modified"].vs_base.low is not None
    )  # six: the fewest with an interval


def test_warm_up_waits_until_three_calls_agree():
    seen = []

    def clock(step, calls):
        seen.append(calls)
        return [0.05, 0.03, 0.02, 0.013, 0.01, 0.0101, 0.0102][len(seen) - 1] if len(seen) <= 7 else 0.01

    lat = measure_latency({"only": "only"}, 1, Settings(min_run_time=0.1, max_run_time=1.0), clock=clock)["only"]
    assert lat.warmup == 7  # the first call, then six: 0.01, 0.0101, 0.0102 are the first three within 10 %
    assert lat.vs_base is None and lat.runs >= 10


@pytest.mark.slow
def test_profile_says_no_difference_resolved_for_identical_timings(cli, monkeypatch):
    """The whole command, its timing replaced by one distribution for both models."""
    rng = random.Random(0)
    monkeypatch.setattr(measure, "block_time", lambda step, calls, device: 0.01 * math.exp(rng.gauss(0, 0.05)))
    args = (
        "profile",
        "resnet18",
        "--attn",
        "se",
        "--stages",
        "4",
        "--input-size",
        "64",
        "--min-time",
        "0.2",
        "--max-time",
        "1",
    )
    code, out, err = cli(*args)
    assert code == 0, err
    row = next(line for line in out.splitlines() if "latency (bs=1)" in line)
    assert "no difference resolved" in row and "[" in row
    code, out, err = cli(*args, "--json")
    ci = json.loads(out)["delta_ci"]
    assert ci["latency_ms"]["median"]["resolved"] is False and ci["latency_ms"]["median"]["low"] <= 0
    assert ci["throughput"]["rounds"] >= 10


def test_the_sweep_plot_draws_each_interval_as_an_error_bar():
    import matplotlib

    matplotlib.use("Agg")
    from attnsurgeon.sweeps.plot import draw_plot, latency_bar

    def row(name, ms, ci=None, pct=None):
        r = {"name": name, "model": "m", "status": "ok", "params": 1e6, "latency_ms": {"median": ms}, "batch_size": 1}
        if ci:
            r |= {
                "delta_ci": {"latency_ms": {"median": {"low": ci[0], "high": ci[1]}}},
                "delta_percent": {"latency_ms": {"median": pct}},
            }
        return r

    rows = [row("base", 10.0), row("se", 11.0, (5.0, 15.0), 10.0), row("few", 12.0, (None, None), 20.0)]
    assert latency_bar(rows[0]) is None and latency_bar(rows[2]) is None
    low, high = latency_bar(rows[1])  # +10 % [+5, +15] around 11 ms: 11 × 1.05 / 1.10 and 11 × 1.15 / 1.10
    assert low == pytest.approx(10.5) and high == pytest.approx(11.5)
    fig = draw_plot(rows)
    segments = [seg for c in fig.axes[0].collections for seg in getattr(c, "get_segments", lambda: [])()]
    assert any(seg[0][1] == pytest.approx(10.5) and seg[1][1] == pytest.approx(11.5) for seg in segments)


@pytest.mark.slow
def test_sweep_rows_carry_the_interval(monkeypatch, tmp_path):
    from attnsurgeon.planning.recipes import Configuration
    from attnsurgeon.planning.schema import InsertionSpec
    from attnsurgeon.sweeps.runner import run_sweep

    rng = random.Random(1)
    monkeypatch.setattr(measure, "block_time", lambda step, calls, device: 0.01 * math.exp(rng.gauss(0, 0.05)))
    config = Configuration("se4", [InsertionSpec(attn="se", stages=[4])])
    result = run_sweep(
        "resnet18", [config], tmp_path, input_size=64, settings={"min_run_time": 0.2, "max_run_time": 1.0, "threads": 1}
    )
    base, se = result.rows
    assert "delta_ci" not in base and se["delta_ci"]["latency_ms"]["median"]["rounds"] >= 10
    header = (tmp_path / "results.csv").read_text().splitlines()[0].split(",")
    assert {"latency_ms_median_delta_ci_low", "throughput_delta_ci_high"} <= set(header)


def test_a_recipe_takes_target_ci_and_checks_it():
    from attnsurgeon.core.errors import AttnSurgeonError
    from attnsurgeon.planning.recipes import parse_recipe

    recipe = parse_recipe({"model": "resnet18", "insertions": [{"attn": "se"}], "profile": {"target_ci": 1.5}})
    assert recipe.profile["target_ci"] == 1.5
    with pytest.raises(AttnSurgeonError, match="profile.target_ci: expected > 0"):
        parse_recipe({"model": "resnet18", "insertions": [{"attn": "se"}], "profile": {"target_ci": 0}})
