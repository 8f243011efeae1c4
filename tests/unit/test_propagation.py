"""Label propagation over features (graftline.propagation)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import make_moons

from graftline.propagation import propagate_labels, reduce_features


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


def test_reduced_features_keep_their_neighbours() -> None:
    # 400 points on a 6-dimensional subspace of 300 dimensions, with a little noise
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 300)) + 0.01 * rng.normal(size=(400, 300))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    small = reduce_features(x, 8)
    assert small.shape == (400, 8)
    np.testing.assert_allclose(np.linalg.norm(small, axis=1), 1, rtol=1e-6)

    def shared_neighbours(f: np.ndarray, g: np.ndarray) -> float:
        """The mean share of each point's 5 nearest neighbours in f that are so in g too."""
        a, b = (np.argsort(((h[:, None] - h[None]) ** 2).sum(-1), axis=1)[:, 1:6] for h in (f, g))
        return float(np.mean([len(np.intersect1d(p, q)) / 5 for p, q in zip(a, b, strict=True)]))

    assert shared_neighbours(x, small) > 0.95
    assert shared_neighbours(x, reduce_features(x, 2)) < 0.8  # too few: the neighbours change
    assert reduce_features(x, 0) is x and reduce_features(x, 300) is x
