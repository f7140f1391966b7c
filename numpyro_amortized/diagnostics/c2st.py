"""Classifier two-sample test (C2ST; Lopez-Paz and Oquab, 2017).

Train a classifier to tell draws of ``a`` from draws of ``b`` and report its
held-out accuracy: 0.5 means the samples are indistinguishable, 1.0 perfectly
separable. This follows the protocol of the SBI benchmark (sbibm; Lueckmann et
al., 2021) so numbers are comparable with published ones: both samples z-scored
with the mean and sd (ddof=1) of ``a``, a ReLU MLP with two hidden layers of
``10 d`` units (adam, up to 10,000 iterations, sklearn's early-stopping
tolerance), accuracy averaged over 5 shuffled cross-validation folds.

Why scikit-learn (a runtime dependency): its ``MLPClassifier`` *is* the
reference protocol; a re-implementation in JAX would give numbers that only
approximately match the published tables. The import is local to :func:`c2st`.
Unequal sample sizes are balanced by a seeded subsample of the larger one, so
chance level stays 0.5.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from numpyro_amortized.diagnostics._samples import as_two_samples

__all__ = ["C2ST", "c2st"]


class C2ST(NamedTuple):
    """Classifier two-sample test result.

    Attributes:
        accuracy: mean held-out accuracy over folds (0.5: same distribution).
        fold_accuracies: ``(num_folds,)`` accuracy per fold.
    """

    accuracy: float
    fold_accuracies: np.ndarray


def c2st(
    a: Any,
    b: Any,
    *,
    seed: int = 1,
    num_folds: int = 5,
    blas_threads: int | None = 1,
) -> C2ST:
    """Cross-validated accuracy of an MLP classifying ``a`` against ``b``.

    Args:
        a: ``(n, d)`` reference draws (sets the z-scoring), or ``(n,)``.
        b: ``(m, d)`` draws to compare, or ``(m,)``.
        seed: seeds the subsample, the folds and the classifier.
        num_folds: cross-validation folds.
        blas_threads: BLAS threads while training (None: no limit). The
            matrices are small; one thread is fastest on a busy machine.

    Returns:
        :class:`C2ST`.

    Examples:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> far = c2st(rng.normal(size=(500, 2)), 5 + rng.normal(size=(500, 2)))
        >>> far.accuracy > 0.95
        True
    """
    from sklearn.model_selection import KFold, cross_val_score
    from sklearn.neural_network import MLPClassifier
    from threadpoolctl import threadpool_limits

    a, b = as_two_samples(a, b, "c2st")
    rng = np.random.default_rng(seed)
    n = min(len(a), len(b))
    if len(a) > n:
        a = a[np.sort(rng.choice(len(a), n, replace=False))]
    if len(b) > n:
        b = b[np.sort(rng.choice(len(b), n, replace=False))]
    mean, sd = a.mean(axis=0), a.std(axis=0, ddof=1)
    sd = np.where(sd > 0, sd, 1.0)
    features = (np.concatenate([a, b]) - mean) / sd
    labels = np.repeat([0, 1], n)
    dim = a.shape[1]
    classifier = MLPClassifier(
        activation="relu",
        hidden_layer_sizes=(10 * dim, 10 * dim),
        max_iter=10_000,
        solver="adam",
        random_state=seed,
    )
    folds = KFold(n_splits=num_folds, shuffle=True, random_state=seed)
    with threadpool_limits(limits=blas_threads, user_api="blas"):
        scores = cross_val_score(
            classifier, features, labels, cv=folds, scoring="accuracy"
        )
    return C2ST(float(np.mean(scores)), np.asarray(scores))
