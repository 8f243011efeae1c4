"""The promotion gate: better, worse, tie, no champion, below the minimum, insignificant win."""

import numpy as np
import pytest

from graftline.registry import gate, mcnemar_p

GATE = {"min_accuracy": 0.8, "min_improvement": 0.0, "alpha": 0.05}


def correct(n: int, wrong: list[int]) -> np.ndarray:
    out = np.ones(n, dtype=bool)
    out[wrong] = False
    return out


def test_no_champion_promoted_when_above_minimum() -> None:
    d = gate(correct(100, [1, 2]), None, **GATE)
    assert d.passed and "no champion yet" in d.reason and d.challenger_accuracy == 0.98


def test_below_minimum_never_promoted() -> None:
    d = gate(correct(10, [0, 1, 2, 3]), None, **GATE)
    assert not d.passed and "below the minimum 0.8000" in d.reason
    champion = correct(10, list(range(8)))
    assert not gate(correct(10, [0, 1, 2, 3]), champion, **GATE).passed


def test_clear_win_is_promoted() -> None:
    champion = correct(400, list(range(40)))  # 0.90
    challenger = correct(400, list(range(38, 48)))  # 0.975: 38 wins, 8 losses
    d = gate(challenger, champion, champion_version="3", **GATE)
    assert d.passed and d.p_value < 1e-4 and "champion v3" in d.reason


def test_worse_and_tie_refused() -> None:
    champion = correct(200, [0, 1])
    assert "no better than" in gate(correct(200, [5, 6, 7]), champion, **GATE).reason
    tie = gate(correct(200, [8, 9]), champion, **GATE)
    assert not tie.passed and "no better than" in tie.reason


def test_small_lucky_win_is_not_significant() -> None:
    champion = correct(100, [0, 1, 2, 3])
    challenger = correct(100, [0, 1, 2])  # one more right: p = 0.5
    d = gate(challenger, champion, **GATE)
    assert not d.passed and "not significant" in d.reason and d.p_value == pytest.approx(0.5)


def test_min_improvement_threshold() -> None:
    champion = correct(1000, list(range(100)))  # 0.90
    challenger = correct(1000, list(range(70)))  # 0.93, significant
    assert gate(challenger, champion, **GATE).passed
    strict = {**GATE, "min_improvement": 0.05}
    d = gate(challenger, champion, **strict)
    assert not d.passed and "less than the minimum" in d.reason


def test_mcnemar_uses_only_disagreements() -> None:
    a = np.array([True] * 50 + [False] * 50)
    assert mcnemar_p(a, a) == 1.0
    b = a.copy()
    b[:5] = False  # challenger a wins 5, loses 0
    assert mcnemar_p(a, b) == pytest.approx(0.5**5)
