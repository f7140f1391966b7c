"""Reference posteriors with NUTS on the same NumPyro model, batched over datasets.

The model is conditioned on the observed sites (``handlers.condition``) with the
model arguments passed through, so NUTS targets exactly the posterior the
amortizer approximates. Every latent continuous site, targets and nuisance alike,
is part of the NUTS state (nuisance sites are marginalized by sampling them).

Two backends:

* ``"numpyro"``: NumPyro's own NUTS kernel (``numpyro.infer.hmc.hmc``, the
  functional core of ``MCMC(NUTS(model))``);
* ``"blackjax"``: blackjax's NUTS with its window adaptation.

With either, the data are a traced argument of one jitted program
(:mod:`numpyro_amortized.nuts_kernels`), so a batch of datasets runs either
``vmap``-ped in **one** program, warmup included (``vectorized=True``, the
default for blackjax), or as a loop over datasets of one compiled single-dataset
program (the default for numpyro). Chains of a dataset are always vectorized.

Both use the NumPyro defaults: target acceptance 0.8, diagonal mass matrix, at
most 2^10 leapfrog steps per transition, initial points uniform in ``(-2, 2)`` in
the unconstrained space (redrawn, up to 100 times, until the log density and its
gradient are finite).

Discrete latent sites: NUTS cannot move them, so they are summed out by
enumeration when their support is finite (``dist.Bernoulli``,
``dist.Categorical``, ...). NumPyro's enumeration needs the ``funsor`` package;
sites are marked ``infer={"enumerate": "parallel"}`` here if the model did not do
it. A discrete latent site with infinite support (``dist.Poisson``) is a
``ValueError`` naming the site.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers

from numpyro_amortized.model import AmortizedModel
from numpyro_amortized.simulate import split_arguments
from numpyro_amortized.sites import run_trace
from numpyro_amortized.varying import MASK_SUFFIX

__all__ = ["NutsResult", "conditioned_model", "run_nuts"]

BACKENDS = ("numpyro", "blackjax")
STAT_NAMES = ("diverging", "num_steps", "accept_prob")


class NutsResult(NamedTuple):
    """NUTS draws for one dataset or a batch of datasets.

    Attributes:
        samples: ``{site: (*batch, num_chains, num_samples, *site_shape)}`` for every
            latent continuous site (targets and nuisance), constrained.
        stats: ``{"diverging", "num_steps", "accept_prob"}``, each
            ``(*batch, num_chains, num_samples)``: divergent transition, leapfrog
            steps, mean acceptance probability of the trajectory.
        wall_time: seconds for the whole run, compilation included.
        backend: ``"numpyro"`` or ``"blackjax"``.
    """

    samples: dict[str, np.ndarray]
    stats: dict[str, np.ndarray]
    wall_time: float
    backend: str


def conditioned_model(
    fn: Callable, model_args: Sequence = (), model_kwargs: dict | None = None
) -> Callable[[dict], Any]:
    """``data -> fn(*model_args, **model_kwargs)`` conditioned on ``data``.

    The data are the only argument, so they can be traced (one compiled sampler
    for all datasets of the same shape) while the model arguments stay Python
    values (they may set shapes, e.g. ``n_obs=50``).
    """
    kwargs = dict(model_kwargs or {})
    args = tuple(model_args)

    def model(data: dict) -> Any:
        return handlers.condition(fn, data=data)(*args, **kwargs)

    return model


def _enumerate_discrete(site: dict) -> dict:
    """``infer`` config marking enumerable discrete latent sites ``parallel``."""
    fn = site["fn"]
    if (
        not site["is_observed"]
        and fn.support.is_discrete
        and fn.has_enumerate_support
        and "enumerate" not in site["infer"]
    ):
        return {"enumerate": "parallel"}
    return {}


def _check_discrete(trace: dict, name: str) -> list[str]:
    """Names of discrete latent sites; raises if NUTS cannot handle one."""
    discrete = []
    for site_name, site in trace.items():
        if site["type"] != "sample" or site["is_observed"]:
            continue
        fn = site["fn"]
        if not fn.support.is_discrete:
            continue
        if not fn.has_enumerate_support:
            raise ValueError(
                f"Latent site '{site_name}' of model '{name}' is discrete with an "
                f"infinite support ({type(fn).__name__}, {fn.support!r}); NUTS "
                "cannot sample it and it cannot be summed out by enumeration. Fix: "
                "marginalize it in the model by hand (e.g. a Poisson count mixed "
                "over a Gamma rate is a NegativeBinomial), or truncate it to a "
                "finite support (dist.Categorical over 0..K)."
            )
        discrete.append(site_name)
    if discrete:
        try:
            import funsor  # noqa: F401
        except ImportError as e:
            raise ImportError(
                f"Model '{name}' has discrete latent site(s) {discrete}; NUTS sums "
                "them out by enumeration, which NumPyro does with the 'funsor' "
                "package. Fix: pip install funsor (or: pip install "
                "'numpyro_amortized[enumerate]')."
            ) from e
    return discrete


def _split_data(
    model: AmortizedModel, data: dict, args: Sequence, kwargs: dict
) -> tuple[dict[str, jax.Array], int]:
    """Observed arrays and the number of leading dataset axes (0 or 1)."""
    if not isinstance(data, dict):
        raise TypeError(
            f"data must be a dict {{site: array}} with the observed sites "
            f"{list(model.observed)}; got {type(data).__name__}."
        )
    sites = model.describe(*args, **kwargs)
    masks = [k for k in data if k.endswith(MASK_SUFFIX)]
    if masks:
        raise ValueError(
            f"NUTS needs unpadded data, got padding mask(s) {masks}. Run one dataset "
            "at a time with its true size: the unpadded arrays and the model "
            "arguments that set that size (model_kwargs={'n_obs': ...})."
        )
    out, batch_ndim = {}, None
    for name in model.observed:
        if name not in data:
            raise ValueError(
                f"Missing observed site '{name}' in the data; got keys "
                f"{sorted(data)}. Pass every observed site: {list(model.observed)}."
            )
        v = jnp.asarray(data[name])
        shape = sites[name].shape
        nb = v.ndim - len(shape)
        if nb not in (0, 1) or tuple(v.shape[nb:]) != shape:
            raise ValueError(
                f"Observed site '{name}' has shape {tuple(v.shape)}; the model with "
                f"these arguments gives {shape} per dataset. Pass {shape} for one "
                f"dataset or (num_datasets, *{shape}) for a batch, or change the "
                "model arguments."
            )
        if batch_ndim is not None and nb != batch_ndim:
            raise ValueError(
                "All observed sites need the same number of dataset axes; site "
                f"'{name}' has {nb}, others {batch_ndim}."
            )
        batch_ndim = nb
        out[name] = v
    sizes = {int(v.shape[0]) for v in out.values()} if batch_ndim else set()
    if len(sizes) > 1:
        raise ValueError(f"Observed sites disagree on the number of datasets: {sizes}.")
    return out, int(batch_ndim)


def run_nuts(
    rng_key: jax.Array,
    model: AmortizedModel,
    data: dict,
    *,
    model_args: Sequence = (),
    model_kwargs: dict | None = None,
    num_samples: int = 1000,
    num_warmup: int = 1000,
    num_chains: int = 4,
    backend: str = "numpyro",
    vectorized: bool | None = None,
    target_accept_prob: float = 0.8,
    max_tree_depth: int = 10,
    progress: bool = False,
) -> NutsResult:
    """NUTS on ``model`` conditioned on ``data``, for one dataset or a batch.

    Args:
        rng_key: JAX PRNG key. In a batch, dataset ``b`` uses
            ``jax.random.split(rng_key, B)[b]``, whatever ``vectorized`` is.
        model: an :class:`~numpyro_amortized.AmortizedModel`.
        data: ``{observed site: array}`` for one dataset, or with one leading
            dataset axis.
        model_args: positional model arguments (as the posterior was built with).
        model_kwargs: keyword model arguments.
        num_samples: draws per chain after warmup.
        num_warmup: adaptation steps per chain (step size and diagonal mass).
        num_chains: chains per dataset.
        backend: the NUTS kernel, ``"numpyro"`` or ``"blackjax"``.
        vectorized: run all datasets in one ``vmap``-ped program (True), or loop
            over datasets calling one compiled single-dataset program (False).
            Default: True for blackjax, False for numpyro.
        target_accept_prob: step-size adaptation target.
        max_tree_depth: at most ``2**max_tree_depth`` leapfrog steps per draw.
        progress: a progress bar over datasets when looping.

    Returns:
        :class:`NutsResult`.

    Raises:
        ValueError: an unknown backend, bad data shapes, padded data, or a
            discrete latent site with infinite support.
        ImportError: discrete latent sites to enumerate but no ``funsor``.

    Examples:
        >>> import jax
        >>> from numpyro_amortized.models import gaussian_means
        >>> x = gaussian_means.simulate(jax.random.key(0), 3)["x"]   # 3 datasets
        >>> ref = run_nuts(jax.random.key(1), gaussian_means, {"x": x},
        ...                num_samples=200, num_warmup=200, num_chains=2,
        ...                backend="blackjax")
        >>> ref.samples["mu"].shape
        (3, 2, 200, 4)
    """
    from numpyro_amortized.nuts_kernels import nuts_program

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}.")
    for label, value in (
        ("num_samples", num_samples),
        ("num_warmup", num_warmup),
        ("num_chains", num_chains),
    ):
        if int(value) < 1:
            raise ValueError(f"{label} must be >= 1; got {value}.")
    model_args, model_kwargs = tuple(model_args), dict(model_kwargs or {})
    obs, batch_ndim = _split_data(model, data, model_args, model_kwargs)
    name = getattr(model.fn, "__name__", "model")
    cond = conditioned_model(model.fn, model_args, model_kwargs)
    first = obs if not batch_ndim else jax.tree.map(lambda v: v[0], obs)
    trace = run_trace(cond, jax.random.key(0), (first,), {})
    _check_discrete(trace, name)
    cond = handlers.infer_config(cond, config_fn=_enumerate_discrete)
    latent = tuple(
        n
        for n, s in trace.items()
        if s["type"] == "sample"
        and not s["is_observed"]
        and not s["fn"].support.is_discrete
    )
    if not latent:
        raise ValueError(f"Model '{name}' has no continuous latent site for NUTS.")
    static_key, _, dynamic = split_arguments(model_args, model_kwargs)
    start = time.perf_counter()
    program = nuts_program(
        cond,
        first,
        latent,
        backend=backend,
        num_samples=int(num_samples),
        num_warmup=int(num_warmup),
        num_chains=int(num_chains),
        target_accept_prob=float(target_accept_prob),
        max_tree_depth=int(max_tree_depth),
        cache_key=None if dynamic else (model.fn, static_key),
    )
    if not batch_ndim:
        samples, stats = program(rng_key[None], jax.tree.map(lambda v: v[None], obs))
    else:
        keys = jax.random.split(rng_key, int(next(iter(obs.values())).shape[0]))
        if vectorized is None:
            vectorized = backend == "blackjax"
        if vectorized:
            samples, stats = program(keys, obs)
        else:
            samples, stats = _loop(program, keys, obs, progress)
    samples = {k: np.asarray(v) for k, v in samples.items()}
    stats = {k: np.asarray(v) for k, v in stats.items()}
    wall = time.perf_counter() - start
    if not batch_ndim:
        samples = {k: v[0] for k, v in samples.items()}
        stats = {k: v[0] for k, v in stats.items()}
    return NutsResult(samples, stats, wall, backend)


def _loop(
    program: Callable, keys: jax.Array, data: dict, progress: bool
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One dataset at a time through the compiled single-dataset program."""
    from tqdm.auto import tqdm

    parts = []
    rows = range(len(keys))
    if progress:
        rows = tqdm(rows, desc="NUTS", unit="dataset")
    for b in rows:
        one = jax.tree.map(lambda v, b=b: v[b : b + 1], data)
        parts.append(jax.device_get(program(keys[b : b + 1], one)))
    return jax.tree.map(lambda *v: np.concatenate(v), *parts)
