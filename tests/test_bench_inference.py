"""The inference benchmark's bookkeeping: rounds of a race, paired ratios, and the targets judged on them."""
import pytest

from goose.bench.common import paired, race
from goose.bench.inference import targets


def test_race_records_every_round():
    calls = iter(range(1, 100))
    rounds: dict = {}
    medians = race({"a": lambda: float(next(calls)), "b": lambda: float(next(calls))}, 3, rounds=rounds)
    assert rounds == {"a": [1.0, 3.0, 5.0], "b": [2.0, 4.0, 6.0]}
    assert medians == {"a": 3.0, "b": 4.0}


def test_paired_is_the_median_of_per_round_ratios():
    # the machine halves its speed in round 2: every round's ratio is 2, the ratio of the medians is not
    fast = [10.0, 5.0, 10.0, 5.0, 5.0]
    slow = [5.0, 2.5, 5.0, 2.5, 2.5]
    assert paired(fast, slow) == 2.0
    assert paired([1.0, 8.0, 2.0], [1.0, 2.0, 2.0]) == 1.0            # ratios 1, 4, 1
    with pytest.raises(ValueError):
        paired([1.0, 2.0], [1.0])


def _result(b1: list[float], b16: list[float]) -> dict:
    med = sorted(b1)[len(b1) // 2], sorted(b16)[len(b16) // 2]
    return {"decode": {}, "prefill": {}, "batch": {"fp32": {1: med[0], 16: med[1]}},
            "rounds": {"decode": {}, "prefill": {}, "batch": {"fp32": {1: b1, 16: b16}}}}


def test_batch_target_is_judged_on_the_paired_ratio():
    def batch_row(b1: list[float], b16: list[float]) -> list:
        return next(row for row in targets(_result(b1, b16)) if row[0].startswith("batched"))

    # B=1 drifts between 10 and 14 tok/s, B=16 follows at 9x within each round
    b1 = [10.0, 14.0, 10.0, 14.0, 14.0]
    assert batch_row(b1, [9 * r for r in b1]) == ["batched decode B=16 >= 8x B=1, goose fp32", "9.00x", "9.00x", "met"]
    # rounds at 9x, 9x and 7x: the medians (14 and 98 tok/s) come from different rounds and say 7x
    assert batch_row([14.0, 10.0, 14.0], [126.0, 90.0, 98.0])[1:] == ["9.00x", "7.00x", "met"]
    # every round below 8x: missed either way
    assert batch_row([10.0, 14.0, 14.0], [70.0, 90.0, 100.0])[1:] == ["7.00x", "6.43x", "MISSED"]
