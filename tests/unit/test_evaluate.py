import numpy as np
import pytest

from graftline.evaluate import classification_metrics, expected_calibration_error


def test_ece_zero_when_confidence_matches_accuracy() -> None:
    # 10 predictions at confidence 0.8, 8 of them right: perfectly calibrated.
    proba = np.tile([0.8, 0.2], (10, 1))
    y = np.array([0] * 8 + [1] * 2)
    assert expected_calibration_error(proba, y) == pytest.approx(0.0)


def test_ece_of_overconfident_model() -> None:
    proba = np.tile([0.99, 0.01], (10, 1))
    y = np.array([0] * 5 + [1] * 5)  # half right at 99% confidence
    assert expected_calibration_error(proba, y) == pytest.approx(0.49)


def test_classification_metrics_per_class() -> None:
    y = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 0])
    proba = np.eye(3)[pred]
    m = classification_metrics(y, proba, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_class"]["b"] == {"precision": pytest.approx(2 / 3), "recall": 1.0, "support": 2}
    assert m["per_class"]["c"]["precision"] == 1.0 and m["per_class"]["c"]["recall"] == 0.5
