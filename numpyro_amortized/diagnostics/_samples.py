"""Shared input handling for the two-sample metrics (C2ST, MMD)."""

from __future__ import annotations

from typing import Any

import numpy as np


def as_two_samples(a: Any, b: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(n, d)`` and ``(m, d)`` float64 arrays; 1-d inputs become one column."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    a = a[:, None] if a.ndim == 1 else a
    b = b[:, None] if b.ndim == 1 else b
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{name} needs samples of shape (n, d) and (m, d); got {a.shape} and "
            f"{b.shape}. Flatten sites with na.diagnostics.flatten_sites."
        )
    if min(len(a), len(b)) < 2:
        raise ValueError(f"{name} needs at least 2 draws in each sample.")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError(f"{name}: the samples contain NaN or inf.")
    return a, b
