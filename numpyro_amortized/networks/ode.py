"""Fixed-step Runge-Kutta (RK4) integration of neural ODEs with exact divergence.

Why a fixed-step classical RK4 and not an adaptive solver: under ``jit`` a fixed
number of steps is a ``lax.scan`` of known length, so the cost of sampling is
deterministic, shapes never change (no recompiles between calls) and the
integration is differentiable by plain reverse-mode through the scan. Flow-matching
velocity fields trained on the straight conditional-OT paths are smooth and nearly
straight, so a few dozen RK4 steps already reach float32-level error (global error
``O(h^4)``). ``num_steps`` is configurable where more accuracy is needed.

Change of variables: for ``dx/dt = v(x, t)`` the log-density along a trajectory
obeys ``d log p(x_t)/dt = -div v(x_t, t)``, so the map from time ``t0`` to ``t1`` has
``log|det dx_{t1}/dx_{t0}| = int_{t0}^{t1} div v(x_t, t) dt``. We integrate the
augmented state ``(x, l)`` with ``dl/dt = div v`` using the *same* RK4 stages, and
compute ``div v = tr(dv/dx)`` exactly with ``jax.jacfwd`` (``d`` forward-mode
passes; cheap for the ``d <= ~20`` dimensions of a posterior). The result is
``O(h^4)``-close to ``log|det|`` of the discretized RK4 map itself.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = ["odeint_rk4", "odeint_rk4_with_log_det"]

# fn(x: (d,), t: scalar, context: (c,)) -> (d,)
VelocityFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def _rk4(f, y0, t0: float, t1: float, num_steps: int):
    """Classical RK4 for a pytree state ``y`` with ``dy/dt = f(t, y)``."""
    h = (t1 - t0) / num_steps

    def step(y, i):
        t = t0 + i * h
        k1 = f(t, y)
        k2 = f(t + h / 2, jax.tree.map(lambda a, k: a + h / 2 * k, y, k1))
        k3 = f(t + h / 2, jax.tree.map(lambda a, k: a + h / 2 * k, y, k2))
        k4 = f(t + h, jax.tree.map(lambda a, k: a + h * k, y, k3))
        y = jax.tree.map(
            lambda a, b, c, d, e: a + h / 6 * (b + 2 * c + 2 * d + e), y, k1, k2, k3, k4
        )
        return y, None

    y, _ = jax.lax.scan(step, y0, jnp.arange(num_steps, dtype=jnp.float32))
    return y


def odeint_rk4(
    fn: VelocityFn,
    x0: jax.Array,
    context: jax.Array,
    *,
    t0: float,
    t1: float,
    num_steps: int,
) -> jax.Array:
    """Solves ``dx/dt = fn(x, t, context)`` from ``t0`` to ``t1`` for a batch.

    Args:
        fn: per-example velocity ``(d,), scalar, (c,) -> (d,)``.
        x0: initial states, shape ``(n, d)``.
        context: per-example context, shape ``(n, c)`` (``c`` may be 0).
        t0, t1: integration interval (``t1 < t0`` integrates backwards).
        num_steps: number of RK4 steps.

    Returns:
        States at ``t1``, shape ``(n, d)``.
    """

    def single(x, c):
        return _rk4(lambda t, y: fn(y, t, c), x, t0, t1, num_steps)

    return jax.vmap(single)(x0, context)


def odeint_rk4_with_log_det(
    fn: VelocityFn,
    x0: jax.Array,
    context: jax.Array,
    *,
    t0: float,
    t1: float,
    num_steps: int,
) -> tuple[jax.Array, jax.Array]:
    """As :func:`odeint_rk4`, also returning ``log|det dx_{t1}/dx_{t0}|`` ``(n,)``.

    The log-determinant is ``int_{t0}^{t1} tr(d fn / dx) dt`` integrated with the same
    RK4 stages as the state; the trace is exact (``jax.jacfwd``).
    """

    def single(x, c):
        def aug(t, y):
            def value_twice(a):
                v = fn(a, t, c)
                return v, v

            jac, v = jax.jacfwd(value_twice, has_aux=True)(y[0])
            return v, jnp.trace(jac)

        y0 = (x, jnp.zeros((), x.dtype))
        return _rk4(aug, y0, t0, t1, num_steps)

    return jax.vmap(single)(x0, context)
