r"""Bayesian (mean-field Gaussian) weights for any network spec.

``bayesian(spec, include=..., exclude=...)`` wraps a flow, summary (or any other)
network spec. The parameters whose paths match the glob patterns
(:mod:`.bayesian_paths`) get a variational posterior

.. math::
    q(w) = \prod_j N(w_j;\, \mu_j,\, \exp(\text{log\_var}_j)),

with :math:`\mu` initialised at the network's usual initialisation and every
log-variance at ``init_logvar`` (default -9: standard deviation 0.011, so training
starts from the ordinary network); the other parameters stay point estimates.
The prior :math:`p(w)` is ``N(0, 1)`` unless ``prior=`` names another scalar
numpyro distribution.

Training minimises, per simulation, the negative ELBO

.. math::
    E_{q(w)}[-\log q(\theta \mid x, w)] + KL(q(w) \| p(w)) / N,

with :math:`N` the number of training simulations; the expectation is estimated
with one reparameterised draw :math:`w = \mu + \sigma \epsilon` per batch (or, with
``local_reparameterization=True``, per example for dense layers, see
:mod:`.bayesian_dense`), the KL in closed form for a Gaussian prior and by Monte
Carlo otherwise (:mod:`.bayesian_kl`).

Called directly, a :class:`BayesianModule` is its **mean network** (every weight
at :math:`\mu`). :func:`sample_weights` draws a plain network from :math:`q`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from flax import nnx

from .bayesian_dense import LocalReparamLinear, local_linear_paths, replace_child
from .bayesian_kl import (
    gaussian_kl,
    is_gaussian_prior,
    monte_carlo_kl,
    prior_from_config,
    prior_to_config,
    validate_prior,
)
from .bayesian_paths import Path, select_paths
from .registry import network_config, network_from_config, register_spec

__all__ = [
    "BayesianModule",
    "BayesianNetwork",
    "LogVariance",
    "bayesian",
    "bayesian_modules",
    "is_bayesian",
    "sample_weights",
]


class LogVariance(nnx.Param):
    """The log-variance of Bayesian weights (a trained ``nnx.Param``)."""


class _Static:
    """Holds a value as static module metadata (a prior may contain arrays,
    which nnx would otherwise treat as state)."""

    def __init__(self, value: Any):
        self.value = value

    def __repr__(self) -> str:
        return repr(self.value)


class BayesianModule(nnx.Module):
    """A network with mean-field Gaussian weights at the selected paths.

    Attributes:
        net: the wrapped network; its parameters are the means (point estimates
            for unselected paths).
        log_variances: one :class:`LogVariance` per selected path.
        paths: the selected parameter paths (static).
        prior: the scalar weight prior.
        local_reparameterization: whether the training loss samples dense
            layers' outputs instead of their weights.

    Calling it (or its flow methods) evaluates the mean network.
    """

    def __init__(
        self,
        net: nnx.Module,
        *,
        include: Sequence[str] = ("**",),
        exclude: Sequence[str] = (),
        init_logvar: float = -9.0,
        prior: dist.Distribution | None = None,
        local_reparameterization: bool = False,
    ):
        if any(isinstance(n, BayesianModule) for _, n in nnx.iter_graph(net)):
            raise ValueError(
                "bayesian(...) was applied to a network that already has Bayesian "
                "weights; wrap the plain network once and select its parameters "
                "with include=/exclude=."
            )
        self.net = net
        include, exclude = _patterns(include, "include"), _patterns(exclude, "exclude")
        self.paths = select_paths(net, include, exclude, name=type(net).__name__)
        flat = dict(nnx.to_flat_state(nnx.state(net, nnx.Param)))
        self.log_variances = nnx.List(
            [
                LogVariance(jnp.full(flat[p][...].shape, init_logvar, jnp.float32))
                for p in self.paths
            ]
        )
        self._prior = _Static(validate_prior(prior))
        self.local_reparameterization = bool(local_reparameterization)

    @property
    def prior(self) -> dist.Distribution:
        """The scalar prior of every Bayesian weight."""
        return self._prior.value

    # ------------------------------------------------------------- weights
    def means(self) -> list[jax.Array]:
        """The means of the selected parameters, in ``paths`` order."""
        flat = dict(nnx.to_flat_state(nnx.state(self.net, nnx.Param)))
        return [flat[p][...] for p in self.paths]

    def variances(self) -> list[jax.Array]:
        """``exp(log_var)`` of the selected parameters, in ``paths`` order."""
        return [jnp.exp(v[...]) for v in self.log_variances]

    def kl(self, rng_key: jax.Array | None = None, num_draws: int = 1) -> jax.Array:
        """``KL(q(w) || p(w))`` summed over the selected weights.

        Closed form for a ``dist.Normal`` prior; otherwise a Monte Carlo estimate
        with ``num_draws`` draws (``rng_key`` is then required).
        """
        means = self.means()
        log_vars = [v[...] for v in self.log_variances]
        if is_gaussian_prior(self.prior):
            return sum(
                gaussian_kl(m, lv, self.prior)
                for m, lv in zip(means, log_vars, strict=True)
            )
        if rng_key is None:
            raise ValueError(
                f"The prior {type(self.prior).__name__} has no closed-form KL; pass "
                "rng_key= for a Monte Carlo estimate."
            )
        total = jnp.zeros(())
        for i, (m, lv) in enumerate(zip(means, log_vars, strict=True)):
            eps = jax.random.normal(
                jax.random.fold_in(rng_key, i), (num_draws, *m.shape)
            )
            w = m + jnp.exp(0.5 * lv) * eps
            total = total + monte_carlo_kl(w, m, lv, self.prior)
        return total

    def sample_weights(
        self, rng_key: jax.Array, *, local_reparameterization: bool = False
    ) -> tuple[nnx.Module, jax.Array]:
        """A plain network with weights drawn from ``q`` and the KL to the prior.

        Args:
            rng_key: key of the weight draw.
            local_reparameterization: if True (and the module was built with
                ``local_reparameterization=True``) dense layers whose kernel is
                selected sample their outputs per example instead (training only;
                the returned network is then not a plain copy of ``net``).

        Returns:
            ``(network, kl)``: the network has the structure of ``net``; ``kl`` is
            closed form for a Gaussian prior, else the one-draw estimate
            ``log q(w) - log p(w)`` at the drawn weights.
        """
        weight_key, noise_key = jax.random.split(rng_key)
        graphdef, state = nnx.split(self.net)
        flat = list(nnx.to_flat_state(state))
        where = {path: i for i, (path, _) in enumerate(flat)}
        means = self.means()
        log_vars = [v[...] for v in self.log_variances]
        draws = [
            m
            + jnp.exp(0.5 * lv)
            * jax.random.normal(jax.random.fold_in(weight_key, i), m.shape)
            for i, (m, lv) in enumerate(zip(means, log_vars, strict=True))
        ]
        local = local_reparameterization and self.local_reparameterization
        selected = dict(zip(self.paths, range(len(self.paths)), strict=True))
        layers = local_linear_paths(self.net, set(self.paths)) if local else []
        skip = {(*lp, name) for lp in layers for name in ("kernel", "bias")}
        for path, i in selected.items():
            if path not in skip:
                j = where[path]
                flat[j] = (path, flat[j][1].replace(draws[i]))
        net = nnx.merge(graphdef, nnx.from_flat_state(flat))
        for k, lp in enumerate(layers):
            kernel = selected[(*lp, "kernel")]
            bias_path = (*lp, "bias")
            bias_mean = bias_var = None
            if bias_path in where:
                bias_mean = dict(flat)[bias_path][...]
                b = selected.get(bias_path)
                bias_var = (
                    jnp.zeros_like(bias_mean) if b is None else jnp.exp(log_vars[b])
                )
            layer = LocalReparamLinear(
                means[kernel],
                jnp.exp(log_vars[kernel]),
                bias_mean,
                bias_var,
                jax.random.fold_in(noise_key, k),
            )
            replace_child(net, lp, layer)
        if is_gaussian_prior(self.prior):
            kl = sum(
                gaussian_kl(m, lv, self.prior)
                for m, lv in zip(means, log_vars, strict=True)
            )
        else:
            kl = sum(
                monte_carlo_kl(w, m, lv, self.prior)
                for w, m, lv in zip(draws, means, log_vars, strict=True)
            )
        return net, jnp.asarray(kl, jnp.float32)

    # -------------------------------------------- the mean network's methods
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.net(*args, **kwargs)

    def forward_and_log_det(self, x, context=None):
        """The mean network's ``forward_and_log_det``."""
        return self.net.forward_and_log_det(x, context)

    def inverse_and_log_det(self, z, context=None):
        """The mean network's ``inverse_and_log_det``."""
        return self.net.inverse_and_log_det(z, context)

    def log_prob(self, x, context=None):
        """The mean network's ``log_prob``."""
        return self.net.log_prob(x, context)

    def sample(self, rng_key, context=None, num_samples=1):
        """Draws from the mean network (flows); see :func:`sample_weights`."""
        return self.net.sample(rng_key, context, num_samples)

    def sample_and_log_prob(self, rng_key, context=None, num_samples=1):
        """The mean network's ``sample_and_log_prob``."""
        return self.net.sample_and_log_prob(rng_key, context, num_samples)

    def loss(self, rng_key, x, context=None):
        """The mean network's loss (training uses sampled weights instead)."""
        return self.net.loss(rng_key, x, context)

    def __getattr__(self, name: str) -> Any:
        # Other attributes (num_params, context_dim, an encoder's methods) are
        # the wrapped network's.
        if name.startswith("_") or name == "net":
            raise AttributeError(name)
        return getattr(self.net, name)


def bayesian_modules(module: nnx.Module) -> list[tuple[Path, BayesianModule]]:
    """``(path, module)`` of every :class:`BayesianModule` inside ``module``."""
    return [
        (tuple(p), n)
        for p, n in nnx.iter_graph(module)
        if isinstance(n, BayesianModule)
    ]


def is_bayesian(module: Any) -> bool:
    """Whether an nnx module holds Bayesian weights anywhere."""
    return isinstance(module, nnx.Module) and bool(bayesian_modules(module))


def sample_weights(
    rng_key: jax.Array,
    module: nnx.Module,
    *,
    local_reparameterization: bool = False,
) -> tuple[nnx.Module, jax.Array]:
    """Replace every Bayesian part of ``module`` by a network drawn from ``q``.

    ``module`` is not changed: the result is a new plain module (the Bayesian
    parts at paths ``p_0, p_1, ...`` in graph order use
    ``fold_in(rng_key, i)``). Pure and jit-able.

    Args:
        rng_key: PRNG key.
        module: a :class:`BayesianModule` or a module containing some.
        local_reparameterization: as in :meth:`BayesianModule.sample_weights`
            (training losses only).

    Returns:
        ``(network, kl)`` with ``kl`` the summed KL of all Bayesian parts.

    Examples:
        >>> from numpyro_amortized.networks import MLP
        >>> net = bayesian(MLP(summary_dim=2, hidden=(4,))).build(3, rngs=nnx.Rngs(0))
        >>> plain, kl = sample_weights(jax.random.key(0), net)
        >>> plain(jnp.ones((5, 3))).shape, bool(kl > 0)
        ((5, 2), True)
    """
    if isinstance(module, BayesianModule):
        return module.sample_weights(
            rng_key, local_reparameterization=local_reparameterization
        )
    found = bayesian_modules(module)
    if not found:
        raise ValueError(
            f"{type(module).__name__} has no Bayesian weights; wrap a network spec "
            "in na.networks.bayesian(...) first."
        )
    module = nnx.clone(module)
    total = jnp.zeros((), jnp.float32)
    for i, (path, _) in enumerate(bayesian_modules(module)):
        node = _get(module, path)
        net, kl = node.sample_weights(
            jax.random.fold_in(rng_key, i),
            local_reparameterization=local_reparameterization,
        )
        replace_child(module, path, net)
        total = total + kl
    return module, total


def _get(root: Any, path: Path) -> Any:
    for key in path:
        root = root[key] if isinstance(key, int) else getattr(root, key)
    return root


# ------------------------------------------------------------------- spec
def _prior_key(prior: Any) -> Any:
    try:
        cfg = prior_to_config(prior)
    except TypeError:
        return id(prior)
    return (cfg["distribution"], tuple(sorted(cfg["kwargs"].items())))


@register_spec
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class BayesianNetwork:
    """Spec: a network spec whose selected parameters get Bayesian weights.

    Made by :func:`bayesian` (see there); ``build(...)`` takes the wrapped spec's
    arguments and returns a :class:`BayesianModule`.
    """

    spec: Any
    include: tuple[str, ...] = ("**",)
    exclude: tuple[str, ...] = ()
    init_logvar: float = -9.0
    prior: Any = None
    local_reparameterization: bool = False

    def __post_init__(self) -> None:
        spec = self.spec
        if isinstance(spec, dict):  # from a saved config
            spec = network_from_config(spec)
        if isinstance(spec, BayesianNetwork):
            raise ValueError("bayesian(...) of a spec that is already Bayesian.")
        if not (isinstance(spec, nnx.Module) or callable(getattr(spec, "build", None))):
            raise TypeError(
                "bayesian(spec) wraps a network spec with a build(...) method (e.g. "
                f"na.networks.NeuralSplineFlow()) or an nnx module; got "
                f"{type(spec).__name__}."
            )
        prior = self.prior
        if isinstance(prior, dict):
            prior = prior_from_config(prior)
        object.__setattr__(self, "spec", spec)
        object.__setattr__(self, "include", _patterns(self.include, "include"))
        object.__setattr__(self, "exclude", _patterns(self.exclude, "exclude"))
        object.__setattr__(self, "init_logvar", float(self.init_logvar))
        object.__setattr__(self, "prior", validate_prior(prior))

    def _key(self) -> tuple:
        return (
            self.spec if not isinstance(self.spec, nnx.Module) else id(self.spec),
            self.include,
            self.exclude,
            self.init_logvar,
            _prior_key(self.prior),
            self.local_reparameterization,
        )

    def __repr__(self) -> str:
        key = _prior_key(self.prior)
        prior = (
            f"{key[0]}({', '.join(f'{k}={v}' for k, v in key[1])})"
            if isinstance(key, tuple)
            else repr(self.prior)
        )
        return (
            f"BayesianNetwork(spec={self.spec!r}, include={self.include}, "
            f"exclude={self.exclude}, init_logvar={self.init_logvar}, "
            f"prior={prior}, local_reparameterization="
            f"{self.local_reparameterization})"
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BayesianNetwork) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def build(self, *args: Any, rngs: nnx.Rngs) -> BayesianModule:
        """Builds the wrapped network (same arguments) and wraps it."""
        net = self.spec if isinstance(self.spec, nnx.Module) else None
        if net is None:
            net = self.spec.build(*args, rngs=rngs)
        return BayesianModule(
            net,
            include=self.include,
            exclude=self.exclude,
            init_logvar=self.init_logvar,
            prior=self.prior,
            local_reparameterization=self.local_reparameterization,
        )

    def to_config(self) -> dict[str, Any]:
        """JSON-able config (raises ``TypeError`` for a prior that cannot be saved)."""
        return {
            "spec": "BayesianNetwork",
            "kwargs": {
                "spec": network_config(self.spec),
                "include": list(self.include),
                "exclude": list(self.exclude),
                "init_logvar": self.init_logvar,
                "prior": prior_to_config(self.prior),
                "local_reparameterization": self.local_reparameterization,
            },
        }


def _patterns(value: Any, where: str) -> tuple[str, ...]:
    patterns = (value,) if isinstance(value, str) else tuple(value)
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"{where} takes glob strings such as '**.bias'; got {p!r}.")
    return patterns


def bayesian(
    spec: Any,
    include: str | Sequence[str] = ("**",),
    exclude: str | Sequence[str] = (),
    *,
    init_logvar: float = -9.0,
    prior: dist.Distribution | None = None,
    local_reparameterization: bool = False,
) -> BayesianNetwork:
    """Give the selected parameters of a network mean-field Gaussian weights.

    Args:
        spec: any network spec (``NeuralSplineFlow()``, ``DeepSet()``, ...) or a
            user nnx module.
        include: dotted glob patterns of parameter paths (relative to the wrapped
            network) to make Bayesian: ``*`` is one path level, ``**`` any number
            (default: every parameter).
        exclude: patterns removed from the selection.
        init_logvar: initial log-variance of every Bayesian weight (the means
            start at the usual initialisation).
        prior: scalar numpyro distribution of every Bayesian weight (default
            ``dist.Normal(0, 1)``; other priors use a Monte Carlo KL).
        local_reparameterization: sample dense layers' outputs per example in
            the training loss (lower-variance gradients; see
            :mod:`.bayesian_dense`).

    Returns:
        A :class:`BayesianNetwork` spec; use it wherever the wrapped spec goes.

    Raises:
        ValueError: when the network is built, a pattern that matches no
            parameter (the message lists the parameter paths).

    Examples:
        >>> import numpyro_amortized as na
        >>> flow = na.networks.bayesian(
        ...     na.networks.NeuralSplineFlow(num_layers=2),
        ...     include=["couplings.*.conditioner.**"], exclude=["**.bias"])
        >>> module = flow.build(2, 3, rngs=nnx.Rngs(0))
        >>> [na.networks.format_path(p) for p in module.paths][:1]
        ['couplings.0.conditioner.hidden_layers.0.kernel']
    """
    return BayesianNetwork(
        spec,
        include=_patterns(include, "include"),
        exclude=_patterns(exclude, "exclude"),
        init_logvar=init_logvar,
        prior=prior,
        local_reparameterization=local_reparameterization,
    )
