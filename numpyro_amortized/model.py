"""``amortize`` / ``AmortizedModel``: a NumPyro model that knows its sites.

The decorated model is still a plain NumPyro model (``MCMC(NUTS(model))``,
``Predictive(model)`` and ``handlers.trace`` see the original function); on top it
describes its sample sites, splits the latent ones into *targets* (inferred by the
amortizer) and *nuisance* (marginalized by simulation), and simulates fast.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from numpyro_amortized.simulate import (
    SimulationInfo,
    SimulatorCache,
    simulate_fixed,
    split_arguments,
)
from numpyro_amortized.sites import SiteInfo, latent_plate_error, trace_sites
from numpyro_amortized.space import LatentSpace
from numpyro_amortized.varying import MASK_SUFFIX, simulate_varying

__all__ = ["AmortizedModel", "amortize"]


class AmortizedModel:
    """A NumPyro model with declared observed sites; see :func:`amortize`.

    Attributes:
        fn: the original model function.
        observed: names of the sites that are data.
    """

    def __init__(
        self,
        fn: Callable,
        observed: Sequence[str],
        targets: Sequence[str] | None = None,
    ):
        if isinstance(observed, str):
            observed = [observed]
        if not observed:
            raise ValueError("amortize(observed=[...]) needs at least one site name.")
        self.fn = fn
        self.observed = tuple(observed)
        self._targets = None if targets is None else tuple(targets)
        self._describe_cache: dict[Any, dict[str, SiteInfo]] = {}
        self._simulators: SimulatorCache | None = None
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the model: exactly ``fn(*args, **kwargs)``."""
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        name = getattr(self.fn, "__name__", "model")
        return f"AmortizedModel({name}, observed={list(self.observed)})"

    # ------------------------------------------------------------------ sites
    def describe(self, *args: Any, **kwargs: Any) -> dict[str, SiteInfo]:
        """Trace the model once with these arguments and describe its sample sites.

        Results are cached per (hashable) argument values.

        Raises:
            ValueError: an observed or target name that is not a sample site, a
                discrete target, no continuous latent site, or data passed for a
                latent site.
            ModelTraceError: the model failed to run.
        """
        key, _, dynamic = split_arguments(args, kwargs)
        if not dynamic and key in self._describe_cache:
            return self._describe_cache[key]
        trace, sites = trace_sites(self.fn, self.observed, args, kwargs)
        self._validate(trace, sites)
        if not dynamic:
            self._describe_cache[key] = sites
        return sites

    @property
    def sites(self) -> dict[str, SiteInfo]:
        """Sample sites with the model's default arguments (``describe()``)."""
        return self.describe()

    def target_names(self, *args: Any, **kwargs: Any) -> tuple[str, ...]:
        """Target sites: given ones, or every continuous latent site."""
        sites = self.describe(*args, **kwargs)
        return self._resolve_targets(sites)

    @property
    def targets(self) -> tuple[str, ...]:
        """Target site names with the default arguments."""
        return self.target_names()

    @property
    def nuisance(self) -> tuple[str, ...]:
        """Latent sites that are not targets (marginalized by simulation)."""
        sites = self.sites
        targets = set(self._resolve_targets(sites))
        return tuple(
            n for n, s in sites.items() if not s.is_observed and n not in targets
        )

    def latent_space(self, *args: Any, **kwargs: Any) -> LatentSpace:
        """The flat, unconstrained space of the target sites."""
        sites = self.describe(*args, **kwargs)
        return LatentSpace.from_sites([sites[n] for n in self._resolve_targets(sites)])

    def summary(self, *args: Any, **kwargs: Any) -> str:
        """A table of the sites: role, shape, support, plates."""
        sites = self.describe(*args, **kwargs)
        targets = set(self._resolve_targets(sites))
        rows = [("site", "role", "shape", "support", "plates")]
        for n, s in sites.items():
            role = (
                "observed"
                if s.is_observed
                else ("target" if n in targets else "nuisance")
            )
            if s.is_discrete and not s.is_observed:
                role += " (discrete)"
            plates = ", ".join(f"{p.name}[{p.size}]" for p in s.plates) or "-"
            rows.append((n, role, str(s.shape), repr(s.support), plates))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        return "\n".join(
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in rows
        )

    def _resolve_targets(self, sites: dict[str, SiteInfo]) -> tuple[str, ...]:
        latent = [n for n, s in sites.items() if not s.is_observed]
        if self._targets is not None:
            return self._targets
        return tuple(n for n in latent if not sites[n].is_discrete)

    def _validate(self, trace: dict, sites: dict[str, SiteInfo]) -> None:
        name = getattr(self.fn, "__name__", "model")
        available = ", ".join(f"'{n}'" for n in sites) or "none"
        for o in self.observed:
            if o not in sites:
                kind = trace[o]["type"] if o in trace else None
                extra = f" (it is a '{kind}' site)" if kind else ""
                raise ValueError(
                    f"Observed site '{o}' is not a sample site of model '{name}'"
                    f"{extra}. Sample sites are: {available}. Fix the names in "
                    "amortize(observed=[...])."
                )
        for n, s in sites.items():
            if not s.is_observed and trace[n]["is_observed"]:
                raise ValueError(
                    f"Site '{n}' is latent but the model was called with data for it "
                    "(obs is not None). Pass data only for the observed sites "
                    f"{list(self.observed)}, or add '{n}' to amortize(observed=...)."
                )
        if self._targets is not None:
            for t in self._targets:
                if t not in sites:
                    raise ValueError(
                        f"Target '{t}' is not a sample site of model '{name}'. "
                        f"Sample sites are: {available}."
                    )
                if sites[t].is_observed:
                    raise ValueError(
                        f"Target '{t}' is declared observed; a site is either data "
                        "(observed) or inferred (target), not both."
                    )
                if sites[t].is_discrete:
                    raise ValueError(
                        f"Target '{t}' is discrete (support {sites[t].support!r}); "
                        "normalizing flows need continuous targets. Leave it out of "
                        "targets: it is then marginalized by simulation."
                    )
        if not self._resolve_targets(sites):
            latent = [n for n, s in sites.items() if not s.is_observed]
            raise ValueError(
                f"Model '{name}' has no continuous latent site to infer (latent "
                f"sites: {latent or 'none'}). Amortized inference needs at least "
                "one continuous latent sample site."
            )
        for n in sites:
            if n.endswith(MASK_SUFFIX) and n[: -len(MASK_SUFFIX)] in sites:
                raise ValueError(
                    f"Site name '{n}' collides with the padding-mask key of site "
                    f"'{n[: -len(MASK_SUFFIX)]}'; rename one of them."
                )

    # ------------------------------------------------------------- simulation
    def simulate(
        self,
        rng_key: jax.Array,
        num_simulations: int,
        *args: Any,
        sample_kwargs: Callable[[jax.Array], dict] | None = None,
        batch_size: int | None = None,
        progress: bool | None = None,
        drop_invalid: bool = True,
        return_info: bool = False,
        **kwargs: Any,
    ) -> dict[str, np.ndarray] | tuple[dict[str, np.ndarray], SimulationInfo]:
        """Draw ``(latents, data)`` from the joint prior predictive, fast.

        Every sample site (targets, nuisance and observed) is returned as a NumPy
        array with a leading ``num_simulations`` axis. Simulations run as
        ``jit(vmap(...))`` programs over chunks, written into host memory.

        Model arguments are either fixed (``*args, **kwargs``, passed to every
        simulation; Python values may set shapes, arrays are program inputs) or
        drawn per batch: ``sample_kwargs(rng_key) -> dict`` is called for every
        batch of ``batch_size`` simulations. Sites whose shape then varies are
        zero-padded and get a boolean ``"<site>_mask"`` entry (see
        :mod:`numpyro_amortized.varying`).

        Simulations with NaN/inf in any floating site are dropped and counted
        (``InvalidSimulationWarning``); if more than half fail, a
        ``SimulationError`` is raised.

        Args:
            rng_key: JAX PRNG key; simulation ``i`` uses ``fold_in(rng_key, i)``.
            num_simulations: number of simulations.
            *args: positional model arguments.
            sample_kwargs: optional ``rng_key -> dict`` of per-batch keyword args.
            batch_size: simulations per compiled call (default: chunks of about
                32 MB; 512 with ``sample_kwargs``).
            progress: progress bar (default: shown when there is more than one
                chunk).
            drop_invalid: drop simulations with NaN/inf.
            return_info: also return a :class:`SimulationInfo`.
            **kwargs: keyword model arguments.

        Returns:
            ``{site: array}``, plus ``info`` when ``return_info``.

        Examples:
            >>> import jax, numpyro, numpyro.distributions as dist
            >>> import numpyro_amortized as na
            >>> @na.amortize(observed=["x"])
            ... def model(n_obs=50, x=None):
            ...     mu = numpyro.sample("mu", dist.Normal(0, 1).expand([4]).to_event(1))
            ...     with numpyro.plate("obs", n_obs):
            ...         numpyro.sample("x", dist.Normal(mu, 1).to_event(1), obs=x)
            >>> sims = model.simulate(jax.random.key(0), 1000)
            >>> sims["mu"].shape, sims["x"].shape
            ((1000, 4), (1000, 50, 4))
        """
        if num_simulations < 1:
            raise ValueError(f"num_simulations must be >= 1, got {num_simulations}.")
        if batch_size is not None and (
            isinstance(batch_size, bool)
            or not isinstance(batch_size, int | np.integer)
            or batch_size < 1
        ):
            raise ValueError(
                "simulate: batch_size (simulations per compiled call) must be an "
                f"integer >= 1, or None for the default; got {batch_size!r}."
            )
        for o in self.observed:
            if kwargs.get(o) is not None:
                raise ValueError(
                    f"simulate() draws the observed site '{o}'; do not pass data "
                    f"for it (got {o}=array{np.shape(kwargs[o])})."
                )
        sites = self.describe(*args, **kwargs)
        if self._simulators is None:
            self._simulators = SimulatorCache(self.fn, tuple(sites))
        elif tuple(sites) != self._simulators.names:
            # Site names depend on arguments here: cache by name set.
            self._simulators = SimulatorCache(self.fn, tuple(sites))
        try:
            values, info = self._simulate(
                rng_key,
                num_simulations,
                args,
                kwargs,
                sites,
                sample_kwargs=sample_kwargs,
                batch_size=batch_size,
                progress=progress,
                drop_invalid=drop_invalid,
            )
        except (
            jax.errors.ConcretizationTypeError,
            jax.errors.TracerIntegerConversionError,
        ) as e:
            trace, _ = trace_sites(self.fn, self.observed, args, kwargs)
            name = getattr(self.fn, "__name__", "model")
            error = latent_plate_error(e, name, trace, self.observed)
            if error is None:
                raise
            raise error from e
        return (values, info) if return_info else values

    def _simulate(
        self,
        rng_key: jax.Array,
        num_simulations: int,
        args: tuple,
        kwargs: dict,
        sites: dict[str, SiteInfo],
        *,
        sample_kwargs: Callable[[jax.Array], dict] | None,
        batch_size: int | None,
        progress: bool | None,
        drop_invalid: bool,
    ) -> tuple[dict[str, np.ndarray], SimulationInfo]:
        if sample_kwargs is None:
            values, info = simulate_fixed(
                self._simulators,
                rng_key,
                num_simulations,
                args,
                kwargs,
                _shapes(sites),
                chunk_size=batch_size,
                progress=progress,
                drop_invalid=drop_invalid,
            )
        else:
            values, info = simulate_varying(
                self._simulators,
                rng_key,
                num_simulations,
                args,
                kwargs,
                sample_kwargs,
                lambda a, k: _shapes(self.describe(*a, **k)),
                batch_size=batch_size or 512,
                progress=progress,
                drop_invalid=drop_invalid,
            )
        return values, info


def _shapes(sites: dict[str, SiteInfo]) -> dict[str, tuple[tuple[int, ...], Any]]:
    return {n: (s.shape, np.dtype(s.dtype)) for n, s in sites.items()}


def amortize(
    observed: Sequence[str], targets: Sequence[str] | None = None
) -> Callable[[Callable], AmortizedModel]:
    """Declare which sites of a NumPyro model are data, for amortized inference.

    The decorated model is still an ordinary NumPyro model. Latent sites are split
    into *targets* (default: every continuous latent site) and *nuisance* (every
    other latent site, discrete ones included), which is simulator randomness
    marginalized by simulation.

    Args:
        observed: names of the sample sites that are data (``obs=`` in the model).
        targets: latent sites to infer; default all continuous latent sites.
            A discrete target is a ``ValueError``.

    Returns:
        A decorator turning a model function into an :class:`AmortizedModel`.

    Examples:
        >>> import numpyro, numpyro.distributions as dist
        >>> import numpyro_amortized as na
        >>> @na.amortize(observed=["x"])
        ... def model(x=None):
        ...     z = numpyro.sample("z", dist.Categorical(probs=jax.numpy.ones(2) / 2))
        ...     loc = numpyro.sample("loc", dist.Normal(0, 1))
        ...     numpyro.sample("x", dist.Normal(loc + z, 1), obs=x)
        >>> model.targets, model.nuisance
        (('loc',), ('z',))
    """

    def decorate(fn: Callable) -> AmortizedModel:
        return AmortizedModel(fn, observed, targets)

    return decorate
