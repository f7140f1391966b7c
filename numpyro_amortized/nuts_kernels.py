"""Jitted NUTS programs over datasets and chains (numpyro's or blackjax's kernel).

For dataset ``b`` with data ``x_b`` the log density on the unconstrained space is
NumPyro's, ``log p(z | x_b) = -U(z; x_b)`` from
``numpyro.infer.util.initialize_model(..., dynamic_args=True)``: Jacobians of the
constraining transforms and enumerated discrete sites are included, and the data
are a traced argument, so one compiled program serves every dataset of the same
shape. One chain is

    z_0 ~ Uniform(-2, 2)   (redrawn until U and its gradient are finite)
    warmup: num_warmup NUTS steps adapting step size (dual averaging) and a
            diagonal mass matrix (Stan's windows)
    draws:  num_samples NUTS steps, constrained with NumPyro's postprocess_fn

with either kernel:

* ``"numpyro"``: ``numpyro.infer.hmc.hmc(potential_fn_gen=..., algo="NUTS")``,
  the functional core of ``MCMC(NUTS(model))`` (same adaptation, same defaults);
* ``"blackjax"``: ``blackjax.window_adaptation`` + ``blackjax.nuts``.

The program is ``jit(vmap_datasets(vmap_chains(chain)))``. Each dataset and chain
adapts its own step size and mass matrix. Compiled programs are cached (at most
:data:`CACHE_SIZE`) by model function, model arguments, sites and settings.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["CACHE_SIZE", "nuts_program"]

CACHE_SIZE = 8
_MAX_INIT_TRIES = 100
_CACHE: OrderedDict[Any, Callable] = OrderedDict()


def initial_position(rng_key: jax.Array, potential: Callable, prototype: Any) -> Any:
    """Uniform(-2, 2) per unconstrained coordinate, redrawn until finite.

    Like NumPyro's ``init_to_uniform``: at most 100 draws; if none is finite the
    last one is returned (NUTS then reports divergences).
    """
    leaves, treedef = jax.tree.flatten(prototype)

    def draw(key):
        ks = jax.random.split(key, len(leaves))
        return jax.tree.unflatten(
            treedef,
            [
                jax.random.uniform(k, jnp.shape(v), jnp.result_type(v), -2.0, 2.0)
                for k, v in zip(ks, leaves, strict=True)
            ],
        )

    def finite(z):
        u, grad = jax.value_and_grad(potential)(z)
        ok = jnp.isfinite(u)
        for g in jax.tree.leaves(grad):
            ok &= jnp.all(jnp.isfinite(g))
        return ok

    def cond(carry):
        tries, _, ok, _ = carry
        return (~ok) & (tries < _MAX_INIT_TRIES)

    def body(carry):
        tries, _, _, key = carry
        key, sub = jax.random.split(key)
        z = draw(sub)
        return tries + 1, z, finite(z), key

    key, sub = jax.random.split(rng_key)
    z = draw(sub)
    _, z, _, _ = jax.lax.while_loop(cond, body, (1, z, finite(z), key))
    return z


def _numpyro_chain(potential_of, prototype, settings):
    from numpyro.infer.hmc import hmc

    num_warmup, num_samples = settings["num_warmup"], settings["num_samples"]

    def chain(key, x):
        init_kernel, sample_kernel = hmc(potential_fn_gen=potential_of, algo="NUTS")
        k_init, k_run = jax.random.split(key)
        z0 = initial_position(k_init, potential_of(x), prototype)
        state = init_kernel(
            z0,
            num_warmup,
            target_accept_prob=settings["target_accept_prob"],
            max_tree_depth=settings["max_tree_depth"],
            model_args=(x,),
            rng_key=k_run,
        )

        def step(state, _):
            state = sample_kernel(state, model_args=(x,))
            return state, (state.z, state.diverging, state.num_steps, state.accept_prob)

        # One scan for warmup and draws (the kernel adapts while i < num_warmup):
        # one copy of the NUTS kernel to compile instead of two.
        _, draws = jax.lax.scan(step, state, None, length=num_warmup + num_samples)
        return jax.tree.map(lambda v: v[num_warmup:], draws)

    return chain


def _blackjax_chain(potential_of, prototype, settings):
    import blackjax
    from blackjax.adaptation.base import get_filter_adapt_info_fn

    def chain(key, x):
        potential = potential_of(x)

        def logdensity(z):
            return -potential(z)

        k_init, k_warm, k_draw = jax.random.split(key, 3)
        z0 = initial_position(k_init, potential, prototype)
        warmup = blackjax.window_adaptation(
            blackjax.nuts,
            logdensity,
            target_acceptance_rate=settings["target_accept_prob"],
            adaptation_info_fn=get_filter_adapt_info_fn(),
            max_num_doublings=settings["max_tree_depth"],
        )
        (state, params), _ = warmup.run(k_warm, z0, num_steps=settings["num_warmup"])
        kernel = blackjax.nuts(logdensity, **params)

        def step(state, k):
            state, info = kernel.step(k, state)
            return state, (
                state.position,
                info.is_divergent,
                info.num_integration_steps,
                info.acceptance_rate,
            )

        keys = jax.random.split(k_draw, settings["num_samples"])
        _, draws = jax.lax.scan(step, state, keys)
        return draws

    return chain


def nuts_program(
    model: Callable,
    first: dict,
    latent: tuple[str, ...],
    *,
    backend: str,
    num_samples: int,
    num_warmup: int,
    num_chains: int,
    target_accept_prob: float,
    max_tree_depth: int,
    cache_key: Any = None,
) -> Callable:
    """A jitted ``(keys (B,), data (B, ...)) -> (samples, stats)`` NUTS program.

    Args:
        model: ``data -> None``, the conditioned model (see
            :func:`numpyro_amortized.nuts.conditioned_model`).
        first: one dataset (traces the model once for the potential).
        latent: latent continuous site names to return.
        backend: ``"numpyro"`` or ``"blackjax"`` kernel.
        num_samples: draws per chain.
        num_warmup: adaptation steps per chain.
        num_chains: chains per dataset.
        target_accept_prob: step-size adaptation target.
        max_tree_depth: maximum number of trajectory doublings.
        cache_key: hashable identity of ``model`` (None: no caching).

    Returns:
        A jitted function; ``samples`` are ``{site: (B, C, S, *shape)}``
        (constrained) and ``stats`` ``{"diverging", "num_steps", "accept_prob":
        (B, C, S)}``.
    """
    settings = dict(
        num_samples=num_samples,
        num_warmup=num_warmup,
        num_chains=num_chains,
        target_accept_prob=target_accept_prob,
        max_tree_depth=max_tree_depth,
    )
    key = None
    if cache_key is not None:
        shapes = tuple((n, v.shape, str(v.dtype)) for n, v in sorted(first.items()))
        key = (cache_key, latent, backend, tuple(sorted(settings.items())), shapes)
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]

    from numpyro.infer.util import initialize_model

    info = initialize_model(
        jax.random.key(0), model, model_args=(first,), dynamic_args=True
    )
    potential_of, postprocess_of = info.potential_fn, info.postprocess_fn
    prototype = info.param_info.z
    make = _numpyro_chain if backend == "numpyro" else _blackjax_chain
    chain = make(potential_of, prototype, settings)

    def dataset(key, x):
        keys = jax.random.split(key, num_chains)
        z, div, steps, accept = jax.vmap(chain, in_axes=(0, None))(keys, x)
        values = jax.vmap(jax.vmap(postprocess_of(x)))(z)
        samples = {n: values[n] for n in latent}
        stats = {"diverging": div, "num_steps": steps, "accept_prob": accept}
        return samples, stats

    program = jax.jit(jax.vmap(dataset))
    if key is not None:
        _CACHE[key] = program
        while len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    return program
