"""Label propagation over features (graftline.propagation)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import make_moons

from graftline.propagation import propagate_labels


def test_labels_follow_the_clusters_where_the_nearest_label_does_not() -> None:
    """Two interleaved moons with one label at the tip of each: the nearest labelled point
    gives much of each moon the other's class; spreading along the k-NN graph gives almost
    every point its own moon's."""
    x, y = make_moons(600, noise=0.05, random_state=0)
    seeds = np.full(len(y), -1)
    tips = [int(np.argmin(x[:, 0])), int(np.argmax(x[:, 0]))]  # moon 0's left, moon 1's right
    seeds[tips] = y[tips]
    nearest = y[tips][np.argmin(((x[:, None] - x[tips][None]) ** 2).sum(-1), axis=1)]
    dist = propagate_labels(x, seeds, 2, neighbours=10)
    assert dist.shape == (600, 2)
    np.testing.assert_allclose(dist.sum(1), 1, atol=1e-5)
    assert np.mean(nearest == y) < 0.85
    assert np.mean(dist.argmax(1) == y) > 0.98


def test_a_cluster_no_label_reaches_gets_no_class() -> None:
    rng = np.random.default_rng(0)
    near, far = rng.normal(0, 0.1, (20, 2)), rng.normal(100, 0.1, (20, 2))
    x = np.concatenate([near, far])
    seeds = np.full(40, -1)
    seeds[0] = 2  # class 2 of 3; the other classes have no label at all
    dist = propagate_labels(x, seeds, 3, neighbours=5)
    assert (dist[:20].argmax(1) == 2).all() and (dist[:20, 2] > 0.99).all()
    assert (dist[20:] == 0).all()


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.full(10, -1), "at least one labelled"),
        (np.array([0] + [-1] * 8), "9 labels"),
        (np.array([5] + [-1] * 9), "label 5 out of range for 3 classes"),
    ],
)
def test_bad_labels_are_clear_errors(labels: np.ndarray, message: str) -> None:
    x = np.random.default_rng(0).normal(size=(10, 4))
    with pytest.raises(ValueError, match=message):
        propagate_labels(x, labels, 3, neighbours=3)
