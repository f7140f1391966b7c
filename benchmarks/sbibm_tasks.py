"""sbibm benchmark tasks as NumPyro models, plus their reference data.

Written from the task definitions of sbibm 1.1.0 (Lueckmann et al., 2021):

* ``two_moons``: theta ~ U(-1, 1)^2; nuisance a ~ U(-pi/2, pi/2), r ~ N(0.1, 0.01);
  p = (r cos a + 0.25, r sin a); x = p + (-|theta1 + theta2| / sqrt 2,
  (theta2 - theta1) / sqrt 2). The data are a deterministic function of the
  target and the nuisance sites, so the observed site is a ``Delta``.
* ``gaussian_linear``: theta ~ N(0, 0.1 I_10), x ~ N(theta, 0.1 I_10) (0.1 is the
  variance); exact posterior N(x / 2, 0.05 I).

Reference observations and posterior samples are read from an sbibm checkout's
``tasks/<task>/files/num_observation_<k>/`` folders (``SBIBM_DIR``, default
``/work/peers/sbibm-data/sbibm``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

import numpyro_amortized as na

__all__ = ["TASKS", "load_observation", "load_reference", "sbibm_dir"]

GAUSSIAN_LINEAR_DIM = 10
GAUSSIAN_LINEAR_VAR = 0.1


@na.amortize(observed=["x"], targets=["theta"])
def two_moons(x=None):
    theta = numpyro.sample("theta", dist.Uniform(-1.0, 1.0).expand([2]).to_event(1))
    a = numpyro.sample("a", dist.Uniform(-math.pi / 2, math.pi / 2))
    r = numpyro.sample("r", dist.Normal(0.1, 0.01))
    p = jnp.stack([r * jnp.cos(a) + 0.25, r * jnp.sin(a)], axis=-1)
    z0 = (theta[..., 0] + theta[..., 1]) / math.sqrt(2.0)
    z1 = (theta[..., 1] - theta[..., 0]) / math.sqrt(2.0)
    value = p + jnp.stack([-jnp.abs(z0), z1], axis=-1)
    numpyro.sample("x", dist.Delta(value, event_dim=1), obs=x)


@na.amortize(observed=["x"])
def gaussian_linear(x=None):
    scale = math.sqrt(GAUSSIAN_LINEAR_VAR)
    theta = numpyro.sample(
        "theta",
        dist.Normal(0.0, scale).expand([GAUSSIAN_LINEAR_DIM]).to_event(1),
    )
    numpyro.sample("x", dist.Normal(theta, scale).to_event(1), obs=x)


TASKS = {"two_moons": two_moons, "gaussian_linear": gaussian_linear}


def sbibm_dir() -> Path:
    return Path(os.environ.get("SBIBM_DIR", "/work/peers/sbibm-data/sbibm"))


def _folder(task: str, num_observation: int) -> Path:
    path = sbibm_dir() / "tasks" / task / "files" / f"num_observation_{num_observation}"
    if not path.is_dir():
        raise FileNotFoundError(f"No sbibm reference data at {path}.")
    return path


def _read_csv(path: Path) -> np.ndarray:
    # pandas-free: a header row, then comma-separated floats (bz2 handled by numpy)
    return np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2, dtype=np.float64)


def load_observation(task: str, num_observation: int) -> np.ndarray:
    """The observation ``(D,)`` of ``num_observation`` (1-based)."""
    return _read_csv(_folder(task, num_observation) / "observation.csv")[0]


def load_reference(task: str, num_observation: int) -> np.ndarray:
    """Reference posterior samples ``(10000, P)`` of ``num_observation``."""
    folder = _folder(task, num_observation)
    return _read_csv(folder / "reference_posterior_samples.csv.bz2")


def load_true_parameters(task: str, num_observation: int) -> np.ndarray:
    """The parameters ``(P,)`` that generated ``num_observation``."""
    return _read_csv(_folder(task, num_observation) / "true_parameters.csv")[0]
