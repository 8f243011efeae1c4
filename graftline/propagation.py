"""Label propagation over a network's features (Iscen et al., "Label Propagation for Deep
Semi-supervised Learning", CVPR 2019): a k-nearest-neighbour graph of the labelled and the
unlabelled items, the few labels spread along it (Zhou et al., 2004, scikit-learn's
``LabelSpreading``), and each unlabelled item gets the class that reaches it most strongly.

The graph follows the data's own clusters, so where a network confidently gives a whole group
of look-alikes the wrong class (MNIST's crossed sevens read as twos, with no crossed seven among
the labels), the group's neighbours can still carry the right one in.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.semi_supervised import LabelSpreading


def propagate_labels(
    features: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    neighbours: int = 50,
    alpha: float = 0.99,
    max_iter: int = 100,
) -> np.ndarray:
    """Spread ``labels`` (``-1``: unlabelled) over the k-NN graph of ``features`` (one row per
    item, compared by Euclidean distance: L2-normalise them for cosine neighbours).

    Returns the class distribution of every item, rows summing to 1; an item the labels do not
    reach (a component of the graph with no label in it) gets a row of zeros. ``alpha`` is how
    much of an item's class comes from its neighbours rather than its own label."""
    labels = np.asarray(labels)
    if len(features) != len(labels):
        raise ValueError(f"{len(features)} feature rows for {len(labels)} labels")
    seen = labels[labels >= 0]
    if not len(seen):
        raise ValueError("label propagation needs at least one labelled item")
    if seen.max() >= num_classes:
        raise ValueError(f"label {seen.max()} out of range for {num_classes} classes")
    k = min(neighbours, len(features) - 1)
    spreading = LabelSpreading(kernel="knn", n_neighbors=k, alpha=alpha, max_iter=max_iter)
    with warnings.catch_warnings():  # not converging to the last digit changes no argmax
        warnings.simplefilter("ignore", ConvergenceWarning)
        spreading.fit(features, labels)
    dist = np.zeros((len(labels), num_classes), np.float32)
    dist[:, spreading.classes_] = np.nan_to_num(spreading.label_distributions_)
    return dist
