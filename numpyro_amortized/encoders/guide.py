"""``EncoderGuide``: an amortized (VAE / AEVB) guide for per-datapoint latents.

For a model with local latents ``z_i`` inside a data plate, the guide is

    q(globals) * prod_i q(z_i | x_i),

where ``q(z_i | x_i)`` is an encoder network applied to datapoint ``x_i`` (the
observed sites in the plate, flattened) and ``q(globals)`` is an AutoGuide part.
The encoder's weights are numpyro params (registered with
``numpyro.contrib.module.nnx_module`` under ``"{prefix}$params"``), so ``SVI``
trains the encoder together with the decoder the model declares.

How a call works: the guide runs the model once, blocked (nothing leaks into the
ELBO's traces), to read the observed values the model sees and the data plate's
subsample indices; it then opens the same plate with those indices (so the model,
replayed against the guide, scores the same datapoints with the same ``N / B``
scale) and samples every local site from its encoder distribution. Under ``jit``
the extra model run costs nothing beyond the observation it reads (the rest is
dead code).

Bayesian encoder weights (an encoder spec wrapped in ``na.networks.bayesian``)
are latent sites ``"{prefix}/<path>"`` drawn once per call outside the data
plate (:mod:`.bayesian`); the model then needs their prior sites,
:meth:`EncoderGuide.model_with_weight_prior`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpyro
import numpyro.distributions as dist
from flax import nnx
from numpyro import handlers
from numpyro.contrib.module import nnx_module
from numpyro.distributions import biject_to
from numpyro.distributions.transforms import IdentityTransform, IndependentTransform
from numpyro.infer.autoguide import AutoGuide

from ..bayesian_guide import (
    BayesianWeight,
    find_bayesian_weights,
    sample_bayesian_weight_prior,
)
from ..epistemic import EpistemicSummary
from .bayesian import bayesian_encoder_module, encoder_epistemic
from .families import default_encoder
from .structure import (
    LocalSite,
    LocalStructure,
    encoder_features,
    find_local_structure,
)

__all__ = ["EncoderGuide", "EncoderNetwork"]


class EncoderNetwork(nnx.Module):
    """One encoder module per local site: ``h -> {site: q(z_site | x)}``.

    A plain nnx module; a site's module may hold Bayesian weights (an encoder
    spec wrapped in ``na.networks.bayesian``), which the guide samples.
    """

    def __init__(self, modules: Mapping[str, nnx.Module]):
        self.sites = nnx.Dict(dict(modules))

    def __call__(self, h: jax.Array) -> dict[str, dist.Distribution]:
        return {name: module(h) for name, module in self.sites.items()}


def _on_support(q: dist.Distribution, site: LocalSite) -> dist.Distribution:
    if site.is_discrete:
        return q
    transform = biject_to(site.support)
    base = transform
    while isinstance(base, IndependentTransform):
        base = base.base_transform
    if isinstance(base, IdentityTransform):
        return q
    return dist.TransformedDistribution(q, transform)


class EncoderGuide:
    """Amortized guide ``q(z_i | x_i)`` for the plate-local latents of a model.

    Args:
        model: a NumPyro model (or ``na.AmortizedModel``) with latent sites inside
            a data plate that also holds the observed sites, e.g.
            ``numpyro.plate("data", N, subsample_size=B)``.
        encoder: a spec (``NormalEncoder()``, ``LaplaceEncoder()``,
            ``StudentTEncoder()``, ``FlowEncoder()``, ``CategoricalEncoder()``,
            ``BernoulliEncoder()``) or an nnx module used for every local site, or
            a dict ``{site: spec or module}``. Default per site: ``NormalEncoder``
            for continuous sites, ``BernoulliEncoder`` / ``CategoricalEncoder`` for
            discrete ones. A module maps ``(B, input_dim)`` to a distribution with
            batch shape ``(B, ...)`` over the site's per-datapoint value (in the
            unconstrained space for continuous sites). A spec wrapped in
            ``na.networks.bayesian(spec, include=..., exclude=...)`` gives the
            selected encoder weights a mean-field Gaussian posterior (train
            against :meth:`model_with_weight_prior`).
        observed: the encoder's input sites; default: the observed sites in the
            data plate (``model.observed`` for an ``AmortizedModel``).
        plate: name of the data plate; default: found by tracing the model.
        local: local latent sites the encoder handles; default: every latent site
            in the data plate.
        global_guide: for latent sites outside the data plate: an AutoGuide class
            or factory (``AutoNormal``, ``functools.partial(AutoNormal,
            init_scale=0.01)``), called with the model with the local sites
            hidden. Alternatively combine this guide with one through
            ``AutoGuideList`` and set ``external_globals=True``.
        preprocess: a function applied to the encoder's input ``(B, input_dim)``
            before the network (e.g. ``lambda h: h / 16`` for pixel counts).
        external_globals: the global sites are sampled by another guide (an
            ``AutoGuideList`` part); without it, global sites and no
            ``global_guide`` is an error (the ELBO would be wrong).
        prefix: name of the numpyro param holding the encoder's weights
            (``"{prefix}$params"``; with Bayesian weights also ``"{prefix}$mean"``,
            ``"{prefix}$log_var"`` and the sites ``"{prefix}/<path>"``).
        seed: seed of the encoder's weight initialization.
        kl_scale: with a Bayesian encoder (``na.networks.bayesian(spec)``), the
            scale of the weight sites on both sides, i.e. the weight of
            ``KL(q(w) || p(w))`` in the ELBO (1: the full-data Bayesian ELBO).
            Train against :meth:`model_with_weight_prior`.

    Examples:
        >>> import jax, jax.numpy as jnp, numpyro, optax
        >>> import numpyro.distributions as dist
        >>> from numpyro.infer import SVI, TraceMeanField_ELBO
        >>> from numpyro_amortized.encoders import EncoderGuide, NormalEncoder
        >>> def model(x):
        ...     with numpyro.plate("data", x.shape[0]):
        ...         z = numpyro.sample("z", dist.Normal(0, 1))
        ...         numpyro.sample("x", dist.Normal(z, 1), obs=x)
        >>> guide = EncoderGuide(model, encoder=NormalEncoder(hidden=()))
        >>> svi = SVI(model, guide, optax.adam(1e-2), TraceMeanField_ELBO())
        >>> x = jax.random.normal(jax.random.key(0), (100,))
        >>> result = svi.run(jax.random.key(1), 2000, x, progress_bar=False)
        >>> q = guide.distributions(result.params, x)["z"]
        >>> bool(jnp.allclose(q.mean, x / 2, atol=0.05))
        True
    """

    def __init__(
        self,
        model: Callable,
        *,
        encoder: Any = None,
        observed: list[str] | tuple[str, ...] | None = None,
        plate: str | None = None,
        local: list[str] | tuple[str, ...] | None = None,
        global_guide: Callable | None = None,
        preprocess: Callable[[jax.Array], jax.Array] | None = None,
        external_globals: bool = False,
        prefix: str = "encoder",
        seed: int = 0,
        kl_scale: float = 1.0,
    ):
        if isinstance(global_guide, AutoGuide):
            raise TypeError(
                "EncoderGuide(global_guide=...) takes an AutoGuide class or factory "
                "(e.g. AutoNormal or functools.partial(AutoNormal, init_scale=0.01)) "
                "so it can be built on the model with the local sites hidden; to "
                "combine built guides use AutoGuideList."
            )
        if observed is None and hasattr(model, "observed"):
            observed = tuple(model.observed)
        self.model = model
        self.encoder = encoder
        self.observed = None if observed is None else tuple(observed)
        self.plate = plate
        self.local = None if local is None else tuple(local)
        self.global_guide_factory = global_guide
        self.external_globals = external_globals
        self.preprocess = preprocess
        self.prefix = prefix
        self.seed = seed
        self.structure: LocalStructure | None = None
        self.network: EncoderNetwork | None = None
        self.global_guide: Callable | None = None
        self.kl_scale = float(kl_scale)
        self.weights: tuple[BayesianWeight, ...] = ()

    # ---------------------------------------------------------------- setup
    def _trace_model(self, args: tuple, kwargs: dict) -> dict:
        key = numpyro.prng_key()
        key = jax.random.key(0) if key is None else key
        traced = handlers.trace(handlers.seed(self.model, key))
        with handlers.block():
            return traced.get_trace(*args, **kwargs)

    def _module_for(self, site: LocalSite, input_dim: int, rngs: nnx.Rngs):
        choice = self.encoder
        if isinstance(choice, Mapping):
            unknown = set(choice) - {s.name for s in self.structure.local}
            if unknown:
                raise ValueError(
                    f"EncoderGuide(encoder=...) names {sorted(unknown)}, which are "
                    "not local sites; local sites: "
                    f"{[s.name for s in self.structure.local]}."
                )
            choice = choice.get(site.name)
        elif isinstance(choice, nnx.Module) and len(self.structure.local) > 1:
            raise ValueError(
                "EncoderGuide: one nnx module was given as encoder= but the model has "
                f"local sites {[s.name for s in self.structure.local]}; pass a dict "
                "{site: module}."
            )
        if choice is None:
            choice = default_encoder(site)
        module = (
            choice
            if isinstance(choice, nnx.Module)
            else choice.build(input_dim, site, rngs=rngs)
        )
        return module

    def _setup(self, trace: dict) -> None:
        structure = find_local_structure(
            trace, observed=self.observed, plate=self.plate, local=self.local
        )
        if (
            structure.global_sites
            and self.global_guide_factory is None
            and not self.external_globals
        ):
            raise ValueError(
                f"EncoderGuide: latent sites {list(structure.global_sites)} are not "
                f"local to plate '{structure.plate}' (they are global, or excluded by "
                "local=); pass global_guide=AutoNormal (or another AutoGuide) for "
                "them, or combine this guide with one through AutoGuideList "
                "(external_globals=True)."
            )
        self.structure = structure
        with jax.ensure_compile_time_eval():
            rngs = nnx.Rngs(self.seed)
            self.network = EncoderNetwork(
                {
                    s.name: self._module_for(s, structure.input_dim, rngs)
                    for s in structure.local
                }
            )
            self.weights = find_bayesian_weights(self.network)
        if structure.global_sites and self.global_guide_factory is not None:
            hidden = [s.name for s in structure.local]
            blocked = handlers.block(handlers.seed(self.model, 0), hide=hidden)
            self.global_guide = self.global_guide_factory(blocked)

    def _features(self, trace: dict) -> jax.Array:
        h = encoder_features(trace, self.structure)
        if h.shape[-1] != self.structure.input_dim:
            raise ValueError(
                f"EncoderGuide: the observed sites {list(self.structure.observed)} "
                f"give {h.shape[-1]} features per datapoint, but the encoder was "
                f"built for {self.structure.input_dim}."
            )
        return h if self.preprocess is None else self.preprocess(h)

    def _encoder(self) -> nnx.Module:
        """This call's encoder network (Bayesian weights drawn as sites)."""
        if not self.weights:
            return nnx_module(self.prefix, self.network)
        return bayesian_encoder_module(
            self.prefix, self.network, self.weights, kl_scale=self.kl_scale
        )

    # --------------------------------------------------------- Bayesian weights
    @property
    def weight_sites(self) -> tuple[str, ...]:
        """Sample sites of the Bayesian encoder weights, ``"<prefix>/<path>"``
        (empty for a point-estimate encoder or before the first call)."""
        return tuple(f"{self.prefix}/{w.name}" for w in self.weights)

    def model_with_weight_prior(self, model: Callable | None = None) -> Callable:
        """The model with prior sites for the encoder's Bayesian weights.

        Train a Bayesian encoder against this model: ``Trace_ELBO`` needs a prior
        site for every weight site of the guide (without it the ELBO lacks
        ``log p(w)`` and the weight variances grow without bound). The weights
        are sampled outside every plate, so ``KL(q(w) || p(w))`` counts once per
        step (times ``kl_scale``) while the data term is scaled by ``N / B``.

        Args:
            model: the model to wrap (default: the guide's model).

        Returns:
            A model that samples each weight site from its module's prior and then
            runs ``model`` with the same arguments.

        Examples:
            >>> spec = na.networks.bayesian(NormalEncoder())  # doctest: +SKIP
            >>> guide = EncoderGuide(model, encoder=spec)  # doctest: +SKIP
            >>> svi = SVI(guide.model_with_weight_prior(), guide, optax.adam(1e-3),
            ...           TraceMeanField_ELBO())  # doctest: +SKIP
        """
        model = self.model if model is None else model

        def with_weight_prior(*args: Any, **kwargs: Any) -> Any:
            if self.structure is None:
                self._setup(self._trace_model(args, kwargs))
            if not self.weights:
                raise ValueError(
                    "EncoderGuide.model_with_weight_prior: the encoder has no "
                    "Bayesian weights; wrap its spec in na.networks.bayesian(...) "
                    "or train against the model itself."
                )
            sample_bayesian_weight_prior(
                self.prefix, self.weights, kl_scale=self.kl_scale
            )
            return model(*args, **kwargs)

        return with_weight_prior

    def epistemic(
        self,
        rng_key: jax.Array,
        params: dict,
        *args: Any,
        num_networks: int = 20,
        **kwargs: Any,
    ) -> EpistemicSummary:
        """How much the encoding of the same data varies across weight draws.

        Encodes the data under ``num_networks`` encoders drawn from ``q(w)``.

        Args:
            rng_key: key of the weight draws.
            params: trained params (``svi_result.params``).
            *args: model arguments (with the data; use the full plate).
            num_networks: number of weight draws ``K``.
            **kwargs: model keyword arguments.

        Returns:
            An :class:`~numpyro_amortized.EpistemicSummary` by local site:
            ``means``/``sds`` are the mean and sd of each draw's encoder
            distribution (in the site's unconstrained space; loc and scale for a
            ``NormalEncoder``), ``(K, B, ...)``, and the spreads across draws.

        Examples:
            >>> s = guide.epistemic(key, params, x, num_networks=20)  # doctest: +SKIP
            >>> s.mean_spread["z"].shape  # (B, k)  # doctest: +SKIP
        """
        if self.structure is None:
            with handlers.block(), handlers.seed(rng_seed=0):
                self._setup(self._trace_model(args, kwargs))
        if not self.weights:
            raise ValueError(
                "EncoderGuide.epistemic needs Bayesian encoder weights; wrap the "
                "encoder spec in na.networks.bayesian(...)."
            )
        return encoder_epistemic(
            lambda key: self._encode(params, args, kwargs, rng_key=key),
            rng_key,
            num_networks=num_networks,
        )

    def _encode(
        self, params: dict, args: tuple, kwargs: dict, *, rng_key: jax.Array | None
    ) -> dict[str, dist.Distribution]:
        """Encoder distributions (unconstrained) for the data in the model args:
        the mean network (``rng_key=None``) or one weight draw."""
        with handlers.block(), handlers.seed(rng_seed=0):
            trace = self._trace_model(args, kwargs)
            if self.structure is None:
                self._setup(trace)
            data = dict(params)
            if self.weights and rng_key is None:
                # the mean network: every weight site at its mean
                means = params.get(f"{self.prefix}$mean")
                if means is None:
                    flat = dict(nnx.to_flat_state(nnx.state(self.network, nnx.Param)))
                    means = {w.name: flat[w.mean_path][...] for w in self.weights}
                data.update(
                    {f"{self.prefix}/{w.name}": means[w.name] for w in self.weights}
                )
            with handlers.substitute(data=data):
                features = self._features(trace)
                if rng_key is None:
                    return self._encoder()(features)
                with handlers.seed(rng_seed=rng_key):
                    return self._encoder()(features)

    # ----------------------------------------------------------------- call
    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, jax.Array]:
        """Samples the global sites (AutoGuide part), the Bayesian encoder weights
        (if any) and every local site; returns ``{site: value}`` of all of them."""
        trace = self._trace_model(args, kwargs)
        if self.structure is None:
            self._setup(trace)
        values: dict[str, jax.Array] = {}
        if self.global_guide is not None:
            values.update(self.global_guide(*args, **kwargs))
        with handlers.trace() as weight_trace:
            network = self._encoder()
        values.update(
            {n: m["value"] for n, m in weight_trace.items() if m["type"] == "sample"}
        )
        qs = network(self._features(trace))
        structure = self.structure
        plate_msg = trace[structure.plate]
        size, subsample_size = plate_msg["args"]
        with handlers.replay(trace={structure.plate: plate_msg}):
            data_plate = numpyro.plate(
                structure.plate,
                size,
                subsample_size=subsample_size,
                dim=structure.plate_dim,
            )
        with data_plate:
            for site in structure.local:
                inner = [
                    numpyro.plate(name, n, dim=dim)
                    for name, n, dim in site.inner_plates
                ]
                for p in inner:
                    p.__enter__()
                try:
                    q = _on_support(qs[site.name], site)
                    values[site.name] = numpyro.sample(site.name, q)
                finally:
                    for p in reversed(inner):
                        p.__exit__(None, None, None)
        return values

    # ------------------------------------------------------------ utilities
    def distributions(
        self, params: dict, *args: Any, **kwargs: Any
    ) -> dict[str, dist.Distribution]:
        """``q(z_i | x_i)`` for every local site, for the data in these model args.

        Args:
            params: trained params (e.g. ``svi_result.params``).
            *args: model arguments (with the data).
            **kwargs: model keyword arguments.

        Returns:
            ``{site: distribution}`` with batch shape ``(B, ...)`` on the site's
            support (for a subsampled plate: a random subsample of ``B`` rows, so
            call with the full data plate to encode every datapoint). A Bayesian
            encoder is evaluated at the means of its weights (the mean network;
            see :meth:`epistemic` for weight draws).
        """
        qs = self._encode(params, args, kwargs, rng_key=None)
        return {s.name: _on_support(qs[s.name], s) for s in self.structure.local}

    def sample_posterior(
        self,
        rng_key: jax.Array,
        params: dict,
        *args: Any,
        sample_shape: tuple[int, ...] = (),
        **kwargs: Any,
    ) -> dict[str, jax.Array]:
        """Draws of every site the guide samples, ``(*sample_shape, ...)`` each.

        Same signature as ``AutoGuide.sample_posterior`` (so the guide works as a
        part of ``AutoGuideList``).
        """

        def one(key: jax.Array) -> dict[str, jax.Array]:
            guide = handlers.substitute(handlers.seed(self, key), data=params)
            return guide(*args, **kwargs)

        keys = jax.random.split(rng_key, math.prod(sample_shape))
        draws = jax.vmap(one)(keys)
        return jax.tree.map(lambda v: v.reshape(*sample_shape, *v.shape[1:]), draws)
