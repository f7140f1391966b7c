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

__all__ = [
    "BayesianAmortizedGuide",
    "BayesianWeight",
    "find_bayesian_weights",
    "sample_bayesian_weight_prior",
    "sample_bayesian_weights",
]


class BayesianWeight(NamedTuple):
    """One selected weight array of a network holding ``BayesianModule`` parts."""

    name: str  # path in the whole network, "flow.net.couplings.0...."
    mean_path: tuple  # of the mean (the wrapped network's parameter)
    log_var_path: tuple  # of its LogVariance
    prior: dist.Distribution  # scalar prior of the module
    shape: tuple[int, ...]


def find_bayesian_weights(net: nnx.Module) -> tuple[BayesianWeight, ...]:
    """Every selected weight of every ``BayesianModule`` inside ``net``.

    Shared by :class:`BayesianAmortizedGuide` and the encoder guide.
    """
    flat = dict(nnx.to_flat_state(nnx.state(net, nnx.Param)))
    return tuple(
        BayesianWeight(
            format_path((*where, "net", *p)),
            (*where, "net", *p),
            (*where, "log_variances", i),
            module.prior,
            tuple(flat[(*where, "net", *p)][...].shape),
        )
        for where, module in bayesian_modules(net)
        for i, p in enumerate(module.paths)
    )


def sample_bayesian_weights(
    prefix: str,
    weights: tuple[BayesianWeight, ...],
    state: nnx.State,
    *,
    kl_scale: float = 1.0,
) -> nnx.State:
    """Guide side: draw the weights as sites ``"<prefix>/<name>"`` into ``state``.

    Registers ``"<prefix>$mean"`` and ``"<prefix>$log_var"`` (``{name: array}``,
    initialised from ``state``'s means and log-variances) and samples each weight
    from ``N(mean, exp(log_var))`` (reparameterized; the sites scaled by
    ``kl_scale``). Returns ``state`` with the drawn weights and the log-variances.
    """
    flat = list(nnx.to_flat_state(state))
    where = {path: i for i, (path, _) in enumerate(flat)}
    means = numpyro.param(
        f"{prefix}$mean", {w.name: flat[where[w.mean_path]][1][...] for w in weights}
    )
    log_vars = numpyro.param(
        f"{prefix}$log_var",
        {w.name: flat[where[w.log_var_path]][1][...] for w in weights},
    )
    with handlers.scale(scale=kl_scale):
        for w in weights:
            mean, log_var = means[w.name], log_vars[w.name]
            q = dist.Normal(mean, jnp.exp(0.5 * log_var)).to_event(len(w.shape))
            value = numpyro.sample(f"{prefix}/{w.name}", q)
            for path, v in ((w.mean_path, value), (w.log_var_path, log_var)):
                i = where[path]
                flat[i] = (path, flat[i][1].replace(v))
    return nnx.from_flat_state(flat)


def sample_bayesian_weight_prior(
    prefix: str, weights: tuple[BayesianWeight, ...], *, kl_scale: float = 1.0
) -> None:
    """Model side: each weight site ``"<prefix>/<name>"`` from its module's prior."""
    with handlers.scale(scale=kl_scale):
        for w in weights:
            prior = w.prior.expand(w.shape).to_event(len(w.shape))
            numpyro.sample(f"{prefix}/{w.name}", prior)


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

    Examples:
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
        weights = find_bayesian_weights(nnx.merge(f.graphdef, f.params, f.rest))
        if not weights:
            raise ValueError(
                "BayesianAmortizedGuide needs a posterior with Bayesian weights "
                "(na.networks.bayesian(...)); use na.AmortizedGuide for this one."
            )
        self.kl_scale = float(kl_scale)
        self.weights: tuple[BayesianWeight, ...] = weights

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
        # $params' entries for the selected weights keep their initial values
        # (unused, no gradient): the trained means and log-variances, which
        # initialise "$mean" and "$log_var".
        state = super().network_params()
        return sample_bayesian_weights(
            self.prefix, self.weights, state, kl_scale=self.kl_scale
        )

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
            sample_bayesian_weight_prior(
                self.prefix, self.weights, kl_scale=self.kl_scale
            )
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
