"""``BayesianAmortizedGuide``: an amortized guide whose Bayesian weights are latents.

When the posterior's networks have Bayesian weights (``na.networks.bayesian``),
``posterior.as_guide()`` returns this subclass of
:class:`~numpyro_amortized.AmortizedGuide`. The only change is where the guide
gets its weights (:meth:`network_params`): every selected weight is a latent
site ``"<prefix>/<path>"`` drawn from ``N(mean, exp(log_var))`` (reparameterized)
with the means and log-variances registered as ``numpyro.param``
``"<prefix>$mean"`` and ``"<prefix>$log_var"`` (dicts by path in the whole
network, initialised from the trained posterior). The other weights stay in
``"<prefix>$params"`` as before (its entries for the selected weights are unused).

Model side. The ELBO needs a prior for every latent site, so the weights need
prior sites in the model: :meth:`BayesianAmortizedGuide.model_with_weight_prior`
wraps the model and samples each weight from its module's prior first. With
``Trace_ELBO`` the objective is then

    E_q(w) E_q(theta | x, w)[log p(x, theta) - log q(theta | x, w)]
        - kl_scale * KL(q(w) || p(w)),

the KL estimated by the one-draw ``log q(w) - log p(w)`` (both weight sites are
scaled by ``kl_scale``, default 1: the proper Bayesian ELBO of one dataset).
Amortized training divides the KL by the number of training simulations;
``kl_scale=1 / N`` continues that objective on one dataset instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from flax import nnx
from numpyro import handlers

from numpyro_amortized.guides import AmortizedGuide, state_from_pure_dict
from numpyro_amortized.networks.bayesian import bayesian_modules
from numpyro_amortized.networks.bayesian_paths import format_path

if TYPE_CHECKING:
    from numpyro_amortized.posterior import AmortizedPosterior

__all__ = ["BayesianAmortizedGuide"]


class _Weight(NamedTuple):
    name: str  # path in the whole network, "flow.net.couplings.0...."
    mean_path: tuple  # of the mean (the wrapped network's parameter)
    log_var_path: tuple  # of its LogVariance
    prior: dist.Distribution  # scalar prior of the module
    shape: tuple[int, ...]


class BayesianAmortizedGuide(AmortizedGuide):
    """An :class:`~numpyro_amortized.AmortizedGuide` sampling its Bayesian weights.

    Same arguments as ``AmortizedGuide`` plus ``kl_scale``. Use it with the model
    wrapped by :meth:`model_with_weight_prior` (the prior sites of the weights).

    Args:
        model: the NumPyro model the posterior was trained on.
        posterior: a trained ``AmortizedPosterior`` with Bayesian weights.
        kl_scale: scale of the weight sites on both sides (the weight of
            ``KL(q(w) || p(w))`` in the ELBO); 1 is the Bayesian ELBO.
        **options: ``data``, ``nuisance_guide``, ``prefix`` (see
            ``AmortizedGuide``).

    Example:
        >>> guide = posterior.as_guide()  # a BayesianAmortizedGuide  # doctest: +SKIP
        >>> svi = SVI(guide.model_with_weight_prior(), guide, optax.adam(1e-4),
        ...           Trace_ELBO())  # doctest: +SKIP
        >>> result = svi.run(jax.random.key(0), 500, x=x_obs)  # doctest: +SKIP
        >>> refined = guide.to_posterior(result.params)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: Callable,
        posterior: AmortizedPosterior,
        *,
        kl_scale: float = 1.0,
        **options: Any,
    ):
        super().__init__(model, posterior, **options)
        f = posterior._require()
        net = nnx.merge(f.graphdef, f.params, f.rest)
        modules = bayesian_modules(net)
        if not modules:
            raise ValueError(
                "BayesianAmortizedGuide needs a posterior with Bayesian weights "
                "(na.networks.bayesian(...)); use na.AmortizedGuide for this one."
            )
        flat = dict(nnx.to_flat_state(f.params))
        self.kl_scale = float(kl_scale)
        self.weights: tuple[_Weight, ...] = tuple(
            _Weight(
                format_path((*where, "net", *p)),
                (*where, "net", *p),
                (*where, "log_variances", i),
                module.prior,
                tuple(flat[(*where, "net", *p)][...].shape),
            )
            for where, module in modules
            for i, p in enumerate(module.paths)
        )

    def __repr__(self) -> str:
        base = super().__repr__()[len("AmortizedGuide") : -1]
        return f"BayesianAmortizedGuide{base}, num_weight_sites={len(self.weights)})"

    # ----------------------------------------------------------------- names
    @property
    def mean_name(self) -> str:
        """Name of the ``numpyro.param`` of the weights' means."""
        return f"{self.prefix}$mean"

    @property
    def log_var_name(self) -> str:
        """Name of the ``numpyro.param`` of the weights' log-variances."""
        return f"{self.prefix}$log_var"

    @property
    def weight_sites(self) -> tuple[str, ...]:
        """Names of the weights' sample sites, ``"<prefix>/<path>"``."""
        return tuple(f"{self.prefix}/{w.name}" for w in self.weights)

    # --------------------------------------------------------------- weights
    def _initial(self) -> tuple[dict, dict]:
        flat = dict(nnx.to_flat_state(self.posterior._require().params))
        means = {w.name: flat[w.mean_path][...] for w in self.weights}
        log_vars = {w.name: flat[w.log_var_path][...] for w in self.weights}
        return means, log_vars

    def init_params(self) -> dict[str, Any]:
        """``{param_name, mean_name, log_var_name: ...}`` as SVI would initialize."""
        means, log_vars = self._initial()
        return {
            **super().init_params(),
            self.mean_name: means,
            self.log_var_name: log_vars,
        }

    def network_params(self) -> nnx.State:
        """The weights of this call: the selected ones drawn from ``q(w)``."""
        state = super().network_params()
        init_means, init_log_vars = self._initial()
        means = numpyro.param(self.mean_name, init_means)
        log_vars = numpyro.param(self.log_var_name, init_log_vars)
        flat = list(nnx.to_flat_state(state))
        where = {path: i for i, (path, _) in enumerate(flat)}
        with handlers.scale(scale=self.kl_scale):
            for w, site in zip(self.weights, self.weight_sites, strict=True):
                mean, log_var = means[w.name], log_vars[w.name]
                q = dist.Normal(mean, jnp.exp(0.5 * log_var)).to_event(len(w.shape))
                value = numpyro.sample(site, q)
                for path, v in ((w.mean_path, value), (w.log_var_path, log_var)):
                    i = where[path]
                    flat[i] = (path, flat[i][1].replace(v))
        return nnx.from_flat_state(flat)

    def model_with_weight_prior(self, model: Callable | None = None) -> Callable:
        """The model with the prior sites of the guide's weights added.

        Args:
            model: the model to wrap (default: the guide's model).

        Returns:
            A model that samples each weight site from its module's prior (scaled
            by ``kl_scale``) and then runs ``model`` with the same arguments.
        """
        model = self.model if model is None else model

        def with_weight_prior(*args: Any, **kwargs: Any) -> Any:
            with handlers.scale(scale=self.kl_scale):
                for w, site in zip(self.weights, self.weight_sites, strict=True):
                    prior = w.prior.expand(w.shape).to_event(len(w.shape))
                    numpyro.sample(site, prior)
            return model(*args, **kwargs)

        return with_weight_prior

    def to_posterior(self, params: Mapping[str, Any]) -> AmortizedPosterior:
        """A Bayesian posterior with the means and log-variances in ``params``.

        Args:
            params: SVI's parameters (``svi_result.params``).

        Returns:
            A new ``AmortizedPosterior`` (the original is unchanged).
        """
        missing = [
            n
            for n in (self.param_name, self.mean_name, self.log_var_name)
            if n not in params
        ]
        if missing:
            raise KeyError(
                f"params has no entries {missing} (got {sorted(params)}); pass the "
                "params of an SVI run with this guide (svi_result.params)."
            )
        f = self.posterior._require()
        state = state_from_pure_dict(f.params, params[self.param_name])
        flat = list(nnx.to_flat_state(state))
        where = {path: i for i, (path, _) in enumerate(flat)}
        for w in self.weights:
            for path, v in (
                (w.mean_path, params[self.mean_name][w.name]),
                (w.log_var_path, params[self.log_var_name][w.name]),
            ):
                i = where[path]
                flat[i] = (path, flat[i][1].replace(jnp.asarray(v)))
        merged = nnx.to_pure_dict(nnx.from_flat_state(flat))
        return super().to_posterior({self.param_name: merged})
