"""``AmortizedGuide``: a trained amortized posterior as an ordinary NumPyro guide.

The guide takes the model's arguments, finds the observed data in them, and
draws every target site from the flow conditioned on that data (through the same
standardization and summary network as :meth:`AmortizedPosterior.sample`). Its
network weights are one ``numpyro.param`` (a pure dict of the nnx ``Param``
state, as :func:`numpyro.contrib.module.nnx_module` registers them), so
``SVI(model, guide, optax.adam(1e-4), Trace_ELBO())`` fine-tunes the amortized
posterior on one dataset and ``Predictive(model, guide=guide, params=...)`` draws
from it.

Sites. Following numpyro's ``AutoContinuous``, the joint draw is one auxiliary
site ``_<prefix>_latent`` (the flat unconstrained vector ``u``, density
:class:`~numpyro_amortized.flow_distribution.FlowDistribution`), and each target
``theta_s = T_s(u_s)`` is a ``Delta`` site whose ``log_density`` is
``-log|det dT_s/du_s|``. The guide's log density is therefore exactly

    log q(u | x) - sum_s log|det dT_s/du_s| = log q(theta | x),

the density :meth:`AmortizedPosterior.log_prob` reports, and ``Trace_ELBO``
estimates ``E_q[log p(x, theta) - log q(theta | x)]`` with reparameterized draws.

Nuisance latent sites (latent sites that are not targets). The ELBO needs a guide
for every latent site of the model, and NPE marginalized these by simulation, so
there is none. By default the guide raises a ``ValueError`` naming them. Pass
``nuisance_guide=AutoNormal`` (any ``AutoGuide`` class, built on the model with
the targets and observed sites hidden) or an already-built guide for those sites;
the ELBO is then over targets and nuisance sites jointly, with
``q(theta | x) q(z)`` (the nuisance part does not see the data through the
network). Discrete nuisance sites need a guide of your own (with
``TraceGraph_ELBO``) or a model that sums them out.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from flax import nnx
from numpyro import handlers

from numpyro_amortized.flow_distribution import FlowDistribution

if TYPE_CHECKING:
    from numpyro_amortized.posterior import AmortizedPosterior

__all__ = ["AmortizedGuide"]


class AmortizedGuide:
    """A trained :class:`~numpyro_amortized.AmortizedPosterior` as a NumPyro guide.

    Call it with the model's arguments (observed data included); it returns the
    target values ``{site: value}`` (and the nuisance guide's, if any).

    Args:
        model: the NumPyro model (an ``AmortizedModel`` or the plain function)
            the guide is used with.
        posterior: a trained ``AmortizedPosterior`` of that model.
        data: optional ``{observed site: array}`` used when the model is called
            without data for an observed site (e.g. ``x=None`` in ``Predictive``
            for posterior-predictive draws).
        nuisance_guide: guide for latent sites that are not targets: an
            ``AutoGuide`` class (built on the model with targets and observed
            sites hidden), an already-built guide, or None (then such sites are
            an error).
        prefix: names the parameter site ``"<prefix>$params"`` and the auxiliary
            site ``"_<prefix>_latent"``; use distinct prefixes for several
            amortized guides in one ``AutoGuideList``.

    Examples:
        With a trained ``posterior`` of ``model`` and a dataset ``x_obs``:

        >>> import jax, optax
        >>> from numpyro.infer import SVI, Trace_ELBO, Predictive
        >>> guide = posterior.as_guide()  # doctest: +SKIP
        >>> svi = SVI(model, guide, optax.adam(1e-4), Trace_ELBO())  # doctest: +SKIP
        >>> result = svi.run(jax.random.key(0), 500, x=x_obs)  # doctest: +SKIP
        >>> refined = guide.to_posterior(result.params)  # doctest: +SKIP
        >>> draws = Predictive(  # posterior-predictive x: data fixed in the guide
        ...     model, guide=posterior.as_guide(data={"x": x_obs}),
        ...     params=result.params, num_samples=1000,
        ... )(jax.random.key(1))  # doctest: +SKIP
    """

    def __init__(
        self,
        model: Callable,
        posterior: AmortizedPosterior,
        *,
        data: Mapping[str, Any] | None = None,
        nuisance_guide: Any = None,
        prefix: str = "amortized",
    ):
        f = posterior._require()
        self.model = model
        self.posterior = posterior
        self.data = None if data is None else dict(data)
        self.prefix = prefix
        self.targets: tuple[str, ...] = f.space.names
        self.observed: tuple[str, ...] = f.layout.names
        self.nuisance: tuple[str, ...] | None = None  # set on the first call
        self._nuisance_spec = nuisance_guide
        self.nuisance_guide: Any = None

    def __repr__(self) -> str:
        return (
            f"AmortizedGuide(targets={list(self.targets)}, "
            f"observed={list(self.observed)}, prefix={self.prefix!r})"
        )

    # -------------------------------------------------------- network weights
    @property
    def param_name(self) -> str:
        """Name of the ``numpyro.param`` site holding the network weights."""
        return f"{self.prefix}$params"

    @property
    def latent_name(self) -> str:
        """Name of the auxiliary site holding the flat unconstrained draw."""
        return f"_{self.prefix}_latent"

    def init_params(self) -> dict[str, Any]:
        """``{param_name: weights}`` of the posterior, as SVI would initialize."""
        return {self.param_name: nnx.to_pure_dict(self.posterior._require().params)}

    def network_params(self) -> nnx.State:
        """The network weights for this call, registered as one ``numpyro.param``.

        This is the one place where the guide obtains its weights: a subclass may
        override it (e.g. to sample Bayesian weights with ``numpyro.sample``) and
        everything else stays the same.
        """
        f = self.posterior._require()
        values = numpyro.param(self.param_name, nnx.to_pure_dict(f.params))
        return state_from_pure_dict(f.params, values)

    def to_posterior(self, params: Mapping[str, Any]) -> AmortizedPosterior:
        """A copy of the posterior with the weights in ``params`` (e.g. SVI's).

        Args:
            params: a dict containing :attr:`param_name` (such as
                ``svi_result.params``); other entries are ignored.

        Returns:
            A new ``AmortizedPosterior``; the original is unchanged.
        """
        if self.param_name not in params:
            raise KeyError(
                f"params has no entry '{self.param_name}' (got {sorted(params)}); "
                "pass the params of an SVI run with this guide (svi_result.params)."
            )
        f = self.posterior._require()
        new = copy.copy(self.posterior)
        state = state_from_pure_dict(f.params, params[self.param_name])
        new._fitted = f._replace(params=jax.tree.map(jnp.asarray, state))
        # The compiled sample/log_prob functions take the weights as arguments and
        # close over the unchanged structure only, so the copy can reuse them.
        new._jitted = dict(self.posterior._jitted)
        new._train_fns, new._validation = (), None
        return new

    # ------------------------------------------------------------- the guide
    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, jax.Array]:
        if self.nuisance is None:
            self._setup(args, kwargs)
        f = self.posterior._require()
        data = self._observed_data(args, kwargs)
        batch = f.layout.batch_shape(data)
        if batch:
            raise ValueError(
                f"AmortizedGuide conditions on one dataset, but the observed data "
                f"have dataset axes {batch}. Call the model on one dataset, or use "
                "posterior.sample for a batch of datasets."
            )
        if not any(isinstance(v, jax.core.Tracer) for v in jax.tree.leaves(data)):
            f.layout.check_finite(data, self.posterior._observed_supports())
        x, mask = f.layout.to_network(data, 0)
        params = self.network_params()
        context = _context(f.graphdef, params, f.rest, f.x_std(x), mask)
        flow = nnx.merge(f.graphdef, params, f.rest).flow
        q = FlowDistribution(flow, context, f.theta_std.mean, f.theta_std.std)
        u = numpyro.sample(self.latent_name, q, infer={"is_auxiliary": True})
        result = {}
        values = f.space.unflatten(u)
        for block in f.space.blocks:
            u_s, t = values[block.name], block.transform
            value = t(u_s)
            if numpyro.get_mask() is False:
                log_density = 0.0
            else:
                log_density = -jnp.sum(t.log_abs_det_jacobian(u_s, value))
            delta = dist.Delta(value, log_density, event_dim=len(block.shape))
            result[block.name] = numpyro.sample(block.name, delta)
        if self.nuisance_guide is not None:
            result.update(self.nuisance_guide(*args, **kwargs))
        return result

    def sample_posterior(
        self,
        rng_key: jax.Array,
        params: Mapping[str, Any],
        *args: Any,
        sample_shape: tuple[int, ...] = (),
        **kwargs: Any,
    ) -> dict[str, jax.Array]:
        """Draws of the guide's latent sites (``AutoGuide`` protocol).

        Args:
            rng_key: JAX PRNG key.
            params: SVI parameters (``svi_result.params``).
            *args: model arguments (observed data included).
            sample_shape: leading shape of the draws.
            **kwargs: model keyword arguments.

        Returns:
            ``{site: (*sample_shape, *site_shape)}``.
        """
        num = 1
        for d in sample_shape:
            num *= int(d)

        def one(key):
            guide = handlers.substitute(handlers.seed(self, key), data=dict(params))
            with handlers.block():
                tr = handlers.trace(guide).get_trace(*args, **kwargs)
            return {
                n: s["value"]
                for n, s in tr.items()
                if s["type"] == "sample" and not s["infer"].get("is_auxiliary")
            }

        draws = jax.vmap(one)(jax.random.split(rng_key, num))
        return jax.tree.map(lambda a: a.reshape(*sample_shape, *a.shape[1:]), draws)

    # --------------------------------------------------------------- helpers
    def _trace_model(self, args: tuple, kwargs: dict) -> dict:
        with handlers.block():
            return handlers.trace(handlers.seed(self.model, 0)).get_trace(
                *args, **kwargs
            )

    def _setup(self, args: tuple, kwargs: dict) -> None:
        """Check the model's sites against the posterior's; build the nuisance part."""
        tr = self._trace_model(args, kwargs)
        samples = {n: s for n, s in tr.items() if s["type"] == "sample"}
        missing = [n for n in self.targets if n not in samples]
        if missing:
            raise ValueError(
                f"AmortizedGuide: target site(s) {missing} of the posterior are not "
                f"sample sites of the model called with these arguments (sample "
                f"sites: {list(samples)}). Use the model the posterior was trained on."
            )
        latent = [
            n
            for n, s in samples.items()
            if not s["is_observed"] and n not in self.observed
        ]
        nuisance = tuple(n for n in latent if n not in self.targets)
        if nuisance and self._nuisance_spec is None:
            discrete = [n for n in nuisance if samples[n]["fn"].support.is_discrete]
            hint = (
                f" Of these, {discrete} are discrete: sum them out in the model (e.g. "
                "a MixtureSameFamily likelihood) or write a guide for them and use "
                "TraceGraph_ELBO."
                if discrete
                else ""
            )
            raise ValueError(
                f"The model has latent site(s) {list(nuisance)} that are not targets "
                f"of the amortized posterior (targets: {list(self.targets)}). The "
                "ELBO needs a guide for every latent site, and NPE marginalized these "
                "by simulation. Pass nuisance_guide=numpyro.infer.autoguide.AutoNormal "
                "(or another AutoGuide class, or a guide for those sites), or make "
                f"them targets of the posterior.{hint}"
            )
        if nuisance:
            spec = self._nuisance_spec
            if isinstance(spec, type):
                hidden = handlers.block(
                    self.model, hide=[*self.targets, *self.observed]
                )
                spec = spec(hidden)
            self.nuisance_guide = spec
        self.nuisance = nuisance

    def _observed_data(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """``{observed site: value}`` from the call, else from ``self.data``."""
        data, tr = {}, None
        for name in self.observed:
            if kwargs.get(name) is not None:
                data[name] = kwargs[name]
                continue
            if tr is None:
                tr = self._trace_model(args, kwargs)
            if name in tr and tr[name]["is_observed"]:
                data[name] = tr[name]["value"]
            elif self.data is not None and name in self.data:
                data[name] = self.data[name]
            else:
                raise ValueError(
                    f"AmortizedGuide: the model was called without data for the "
                    f"observed site '{name}', so there is nothing to condition on. "
                    f"Pass it ({name}=...), or build the guide with "
                    f"data={{'{name}': x_obs}} (e.g. for posterior-predictive "
                    "draws with Predictive)."
                )
        return data


@functools.partial(jax.jit, static_argnums=0)
def _context(graphdef, params, rest, x, mask):
    """The flow's context for standardized data (one compiled pass, see
    :mod:`numpyro_amortized.flow_distribution`)."""
    return nnx.merge(graphdef, params, rest).context(x, mask)


def state_from_pure_dict(template: nnx.State, values: Mapping) -> nnx.State:
    """A copy of ``template`` (an nnx ``State``) holding the arrays of ``values``.

    ``values`` is a pure dict as made by ``nnx.to_pure_dict(template)``; works on
    traced arrays (inside ``jit`` and ``grad``).
    """
    state = jax.tree.map(lambda a: a, template)
    nnx.replace_by_pure_dict(state, values)
    return state
