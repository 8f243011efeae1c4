"""Label propagation over a network's features (Iscen et al., "Label Propagation for Deep
Semi-supervised Learning", CVPR 2019): a k-nearest-neighbour graph of the labelled and the
unlabelled items, the few labels spread along it (Zhou et al., "Learning with Local and Global
Consistency", NeurIPS 2004), and each unlabelled item gets the class that reaches it most
strongly.

The graph follows the data's own clusters, so where a network confidently gives a whole group
of look-alikes the wrong class (MNIST's crossed sevens read as twos, with no crossed seven among
the labels), the group's neighbours can still carry the right one in.

The graph is scikit-learn's ``kneighbors_graph``, made symmetric as Zhou et al. and Iscen et al.
have it. scikit-learn's own ``LabelSpreading(kernel="knn")`` leaves the k-NN graph one-sided;
on the features of a student trained with 100 MNIST labels its labels were wrong on 2.14 % of
the 60,000 images, against 1.78 % with the symmetric graph (50 neighbours; 1.65 % with 30).
"""

from __future__ import annotations

import numpy as np

# scikit-learn and SciPy are imported where they are used: the distill stage imports this
# module on every run, and most runs propagate nothing (1.2 s of imports saved).


def reduce_features(features: np.ndarray, dims: int, seed: int = 0) -> np.ndarray:
    """The first ``dims`` principal components of ``features``, L2-normalised (``dims`` 0, or
    not fewer than the features have: the features as they are). A flattened conv map has
    thousands of dimensions; on MNIST, 128 components of the CNN's 1,600 gave labels nearly
    as good (1.52 % wrong against 1.50 %) in 21 s of propagation against 150 s."""
    if not dims or dims >= min(features.shape):
        return features
    from sklearn.decomposition import PCA

    reduced = PCA(dims, random_state=seed).fit_transform(features)
    return reduced / np.maximum(np.linalg.norm(reduced, axis=1, keepdims=True), 1e-12)


def propagate_labels(
    features: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    neighbours: int = 30,
    alpha: float = 0.99,
    iterations: int = 100,
) -> np.ndarray:
    """Spread ``labels`` (``-1``: unlabelled) over the symmetric k-NN graph of ``features``
    (one row per item, compared by Euclidean distance: L2-normalise them for cosine
    neighbours): ``F <- alpha * S F + (1 - alpha) * Y``, with ``S`` the graph's normalised
    adjacency ``D^-1/2 W D^-1/2`` and ``Y`` the one-hot labels.

    Returns the class distribution of every item, rows summing to 1; an item the labels do not
    reach (a component of the graph with no label in it) gets a row of zeros. ``alpha`` is how
    much of an item's class comes from its neighbours rather than its own label."""
    labels = np.asarray(labels)
    if len(features) != len(labels):
        raise ValueError(f"{len(features)} feature rows for {len(labels)} labels")
    seen = labels >= 0
    if not seen.any():
        raise ValueError("label propagation needs at least one labelled item")
    if labels.max() >= num_classes:
        raise ValueError(f"label {labels.max()} out of range for {num_classes} classes")
    k = min(neighbours, len(features) - 1)
    import scipy.sparse as sp
    from sklearn.neighbors import kneighbors_graph

    w = kneighbors_graph(features, k, mode="connectivity", include_self=False)
    w = ((w + w.T) > 0).astype(np.float32)  # i near j or j near i
    inv_sqrt = 1 / np.sqrt(np.asarray(w.sum(axis=1)).ravel())
    s = sp.diags(inv_sqrt) @ w @ sp.diags(inv_sqrt)
    y = np.zeros((len(labels), num_classes), np.float32)
    y[seen, labels[seen]] = 1
    f = y.copy()
    for _ in range(iterations):
        f = alpha * (s @ f) + (1 - alpha) * y
    mass = f.sum(axis=1, keepdims=True)
    return np.divide(f, mass, out=np.zeros_like(f), where=mass > 0)
