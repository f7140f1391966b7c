"""``AmortizedPosterior``: fit once, posteriors for any dataset in milliseconds.

A thin object over the pure pieces: the model simulates, :mod:`.space` maps target
sites to a flat unconstrained vector, :mod:`.data` turns observed sites into
network input, :mod:`.train` runs jitted epochs, and the flow (with its summary
network) is an nnx module split into ``(graphdef, params)`` at jit boundaries.

Densities. The flow models standardized unconstrained targets
``v = (u - m) / s`` with ``u = T^{-1}(theta)``. So

    log q(theta | x) = log q_v(v | x) - sum(log s) + log|det dT^{-1}(theta)/dtheta|,

which :meth:`AmortizedPosterior.log_prob` evaluates exactly.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from numpyro_amortized import networks as nets
from numpyro_amortized.amortizer import build_amortizer
from numpyro_amortized.chunked import sample_flow
from numpyro_amortized.data import ObservationLayout, Standardizer
from numpyro_amortized.history import History
from numpyro_amortized.model import AmortizedModel
from numpyro_amortized.space import LatentSpace
from numpyro_amortized.validation import (
    check_count,
    check_model_structure,
    check_online_options,
    check_structure,
    resolve_summary,
)
from numpyro_amortized.varying import mask_key

__all__ = ["AmortizedPosterior", "NotFittedError"]


class NotFittedError(RuntimeError):
    """The posterior was used before ``fit``."""


class _Fitted(NamedTuple):
    graphdef: Any
    params: Any
    rest: Any
    space: LatentSpace
    layout: ObservationLayout
    theta_std: Standardizer
    x_std: Standardizer
    summary_net: Any = None  # the summary spec/module used (after defaults)


class AmortizedPosterior:
    """An amortized posterior ``q(targets | data)`` for a NumPyro model.

    Defaults (no tuning needed for 1-20 parameters and up to a few hundred
    observations):

    * ``inference_net``: :class:`~numpyro_amortized.networks.NeuralSplineFlow`
      (rational-quadratic spline coupling; flexible for multimodal and skewed
      posteriors, exact densities).
    * ``summary_net`` is chosen from the model's structure: when every observed site
      sits in one plate, each dataset is a *set* of observations and a
      :class:`~numpyro_amortized.networks.DeepSet` pools over that plate's axis
      (permutation invariant, any number of observations, padding masks honoured);
      otherwise the flattened, standardized observation is the flow's context
      directly (fixed-size data needs no learned summary).

    Training data are standardized from the bank: targets in the unconstrained
    space (so draws always respect each site's support), and network inputs per
    feature.

    Args:
        model: an :class:`~numpyro_amortized.AmortizedModel` (``@na.amortize``).
        inference_net: a flow spec (default ``NeuralSplineFlow()``).
        summary_net: a summary spec or a user nnx module called as
            ``module(x, mask=None)``; default chosen as above.
        targets: latent sites to infer (default: the model's targets).
        model_args: positional model arguments for simulation and shapes.
        model_kwargs: keyword model arguments for simulation and shapes.

    Examples:
        >>> import jax, numpyro_amortized as na
        >>> from numpyro_amortized.models import gaussian_means
        >>> posterior = na.AmortizedPosterior(gaussian_means)
        >>> history = posterior.fit(jax.random.key(1), num_simulations=2_000,
        ...                         max_epochs=2, progress=False)
        >>> x_obs = gaussian_means.simulate(jax.random.key(2), 1)["x"][0]
        >>> posterior.sample(jax.random.key(3), {"x": x_obs}, 500)["mu"].shape
        (500, 4)
    """

    def __init__(
        self,
        model: AmortizedModel,
        inference_net: Any = None,
        summary_net: Any = None,
        targets: Sequence[str] | None = None,
        *,
        model_args: Sequence = (),
        model_kwargs: dict | None = None,
    ):
        if not isinstance(model, AmortizedModel):
            raise TypeError(
                "AmortizedPosterior needs a model decorated with "
                "@na.amortize(observed=[...]); got "
                f"{type(model).__name__}."
            )
        if targets is not None:
            model = AmortizedModel(model.fn, model.observed, targets)
        self.model = model
        self.inference_net = (
            nets.NeuralSplineFlow() if inference_net is None else inference_net
        )
        self.summary_net = summary_net
        self.model_args = tuple(model_args)
        self.model_kwargs = dict(model_kwargs or {})
        self.history: History | None = None
        self._fitted: _Fitted | None = None
        self._jitted: dict[str, Callable] = {}
        self._train_fns: tuple = ()
        self._validation: Any = None

    # ---------------------------------------------------------------- set up
    @property
    def is_fitted(self) -> bool:
        """Whether networks exist (after the first ``fit``)."""
        return self._fitted is not None

    @property
    def space(self) -> LatentSpace:
        """The flat unconstrained space of the targets."""
        return self._require().space

    @property
    def layout(self) -> ObservationLayout:
        """How observed sites become network input."""
        return self._require().layout

    @property
    def is_bayesian(self) -> bool:
        """Whether some network weights are Bayesian (``na.networks.bayesian``)."""
        f = self._require()
        return nets.is_bayesian(nnx.merge(f.graphdef, f.params, f.rest))

    def _require(self) -> _Fitted:
        if self._fitted is None:
            raise NotFittedError(
                "This AmortizedPosterior has not been trained: call "
                "posterior.fit(rng_key, num_simulations=...) (or fit_online) first."
            )
        return self._fitted

    def _build(self, rng_key: jax.Array, sims: dict[str, np.ndarray]) -> None:
        sites = self.model.describe(*self.model_args, **self.model_kwargs)
        targets = self.model.target_names(*self.model_args, **self.model_kwargs)
        space = LatentSpace.from_sites([sites[n] for n in targets])
        layout = ObservationLayout.from_sites([sites[n] for n in self.model.observed])
        u = self._unconstrain_bank(space, sims)
        theta_std = Standardizer.fit(u[np.isfinite(u).all(axis=1)])
        x, mask = layout.to_network(sims, batch_ndim=1)
        x = np.asarray(x)
        rows = np.isfinite(x.reshape(len(x), -1)).all(axis=1)  # drop broken rows
        x_std = Standardizer.fit(x[rows], None if mask is None else mask[rows])
        summary_spec = resolve_summary(self.summary_net, layout)
        name = getattr(self.model.fn, "__name__", "model")
        check_structure(sites, targets, layout, summary_spec, name)
        if summary_spec is not None:
            if not layout.is_set and _is_set_spec(summary_spec):
                raise ValueError(
                    f"summary_net={summary_spec!r} expects a set of observations, but "
                    f"the observed sites {list(layout.names)} do not share a plate. "
                    "Use na.networks.MLP() or summary_net=None."
                )
        net = build_amortizer(
            rng_key, self.inference_net, summary_spec, space.dim, layout
        )
        graphdef, params, rest = nnx.split(net, nnx.Param, ...)
        self._fitted = _Fitted(
            graphdef, params, rest, space, layout, theta_std, x_std, summary_spec
        )
        self._jitted = {}

    @staticmethod
    def _unconstrain_bank(space: LatentSpace, sims: dict) -> np.ndarray:
        missing = [n for n in space.names if n not in sims]
        if missing:
            raise ValueError(
                f"The simulations lack target site(s) {missing}; got {sorted(sims)}."
            )
        u, _ = jax.jit(space.unconstrain)({n: sims[n] for n in space.names})
        return np.asarray(u)

    def _prepare(self, sims: dict) -> tuple[tuple, int]:
        """Bank -> standardized device arrays; drops non-finite rows."""
        f = self._require()
        u = self._unconstrain_bank(f.space, sims)
        x, mask = f.layout.to_network(sims, batch_ndim=1)
        x = np.asarray(x)
        ok = np.isfinite(u).all(axis=1)
        finite_x = np.isfinite(x)
        if mask is not None:
            finite_x |= ~np.asarray(mask)[..., None]
        ok &= finite_x.reshape(len(x), -1).all(axis=1)
        dropped = int((~ok).sum())
        if not ok.any():
            raise ValueError(
                f"All {len(ok)} simulations have NaN/inf in a target "
                f"{list(f.space.names)} or an observed site {list(f.layout.names)}; "
                "there is nothing to train on. Check the simulator or the bank."
            )
        u, x = u[ok], np.where(np.isfinite(x[ok]), x[ok], 0.0)
        mask = None if mask is None else jnp.asarray(np.asarray(mask)[ok])
        arrays = (
            jnp.asarray(f.theta_std(u), jnp.float32),
            jnp.asarray(f.x_std(x), jnp.float32),
            mask,
        )
        return arrays, dropped

    def _loss_fn(self, num_simulations: int | None = None) -> Callable:
        """Per-example training loss; with Bayesian weights the negative ELBO with
        the KL scaled by ``1 / num_simulations`` (:mod:`.epistemic`)."""
        f = self._require()
        graphdef, rest = f.graphdef, f.rest
        if self.is_bayesian:
            from numpyro_amortized.epistemic import bayesian_loss_fn

            return bayesian_loss_fn(graphdef, rest, num_simulations)

        def loss_fn(params, rng_key, batch):
            theta, x, mask = batch
            net = nnx.merge(graphdef, params, rest)
            return net.loss(rng_key, theta, x, mask)

        return loss_fn

    # ------------------------------------------------------------- training
    def fit(
        self,
        rng_key: jax.Array,
        num_simulations: int | None = None,
        *,
        simulations: dict[str, np.ndarray] | None = None,
        sample_kwargs: Callable[[jax.Array], dict] | None = None,
        num_rounds: int = 1,
        batch_size: int | None = None,
        max_epochs: int = 200,
        learning_rate: float = 1e-3,
        validation_fraction: float = 0.1,
        patience: int = 20,
        progress: bool = True,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 1,
        resume_from: str | os.PathLike | None = None,
        devices: Sequence[Any] | None = None,
        chunk_size: int | None = None,
    ) -> History:
        """Train on a fixed simulation budget (offline).

        Either simulate ``num_simulations`` from the model (``num_rounds`` times: a
        new bank per round, training continues from the previous weights), or
        train on ``simulations``, a bank the user already has (e.g.
        ``model.simulate`` output or :func:`~numpyro_amortized.load_simulations`).

        Defaults: Adam with cosine decay over ``max_epochs`` and gradient clipping
        at norm 1; batches of 128, smaller on banks under ~7,000 simulations so
        that an epoch has about 50 steps; ``validation_fraction`` of the bank held
        out; early stopping
        after ``patience`` epochs without a better validation loss, restoring the
        best weights. One epoch is one jitted ``lax.scan``. Calling ``fit`` again
        continues training (standardization is kept from the first call).

        A :class:`~numpyro_amortized.DiskBank` as ``simulations`` (a bank larger
        than memory, see :func:`~numpyro_amortized.simulate_to_disk`) is streamed
        from disk in chunks (:mod:`numpyro_amortized.streaming`).

        Args:
            rng_key: JAX PRNG key.
            num_simulations: simulations per round (if ``simulations`` is None).
            simulations: a bank ``{site: array}`` with a leading simulation axis,
                or a :class:`~numpyro_amortized.DiskBank`.
            sample_kwargs: per-batch model arguments for simulation (e.g. a random
                ``n_obs``); datasets are then padded and masked. Only arguments
                that set the observed sites' shapes may vary (the networks see
                them through the mask); any other varying argument (e.g. a
                design matrix) is refused with a ``ValueError``: make it an
                observed site or keep it fixed.
            num_rounds: rounds of simulate-then-train.
            batch_size: examples per optimizer step (default: the number of
                training rows // 50, rounded down to a multiple of 16, within
                ``[16, 128]``; see ``numpyro_amortized.train.default_batch_size``).
            max_epochs: upper bound on epochs per round.
            learning_rate: peak learning rate.
            validation_fraction: share of the bank held out (0 disables early
                stopping).
            patience: epochs without improvement before stopping.
            progress: show a tqdm progress bar.
            checkpoint_dir: write ``checkpoint.npa`` (everything needed to resume)
                every ``checkpoint_every`` epochs and at the end of each round, and
                ``best.npa`` (a posterior with the best weights so far) whenever
                the validation loss improves; see :mod:`numpyro_amortized.io`.
            checkpoint_every: epochs between checkpoints.
            resume_from: a checkpoint file (or its directory) written by an
                interrupted ``fit`` with the same ``rng_key`` and settings;
                training continues where it stopped and ends with exactly the
                weights of an uninterrupted run.
            devices: devices for data-parallel training (default: all of
                ``jax.devices()``; with more than one, each batch is split over
                them, see :mod:`numpyro_amortized.sharding`); a given ``batch_size``
                must be a multiple of their number.
            chunk_size: rows per streamed chunk when ``simulations`` is a
                ``DiskBank`` (default: about 64 MB of rows).

        Returns:
            The :class:`~numpyro_amortized.History` (also ``self.history``).

        Raises:
            ValueError: an option outside its range, a malformed ``simulations``
                dict, a varying argument the networks would not see, or model
                structure not supported yet (a target inside the plate that a
                pooling summary pools over); see
                :mod:`numpyro_amortized.validation`.
        """
        from numpyro_amortized import fitting

        with _restored_on_error(self):
            return fitting.fit_offline(
                self,
                rng_key,
                num_simulations,
                simulations=simulations,
                sample_kwargs=sample_kwargs,
                num_rounds=num_rounds,
                batch_size=batch_size,
                max_epochs=max_epochs,
                learning_rate=learning_rate,
                validation_fraction=validation_fraction,
                patience=patience,
                progress=progress,
                checkpoint_dir=checkpoint_dir,
                checkpoint_every=checkpoint_every,
                resume_from=resume_from,
                devices=devices,
                chunk_size=chunk_size,
            )

    def fit_online(
        self,
        rng_key: jax.Array,
        num_steps: int = 20_000,
        *,
        batch_size: int = 128,
        steps_per_epoch: int = 500,
        learning_rate: float = 1e-3,
        num_validation: int = 2_000,
        patience: int | None = None,
        num_effective_simulations: int | None = None,
        progress: bool = True,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 1,
        resume_from: str | os.PathLike | None = None,
        devices: Sequence[Any] | None = None,
    ) -> History:
        """Train on fresh simulations every step (simulated inside the jitted step).

        For fast simulators: no bank, no overfitting. A pilot bank of
        ``num_validation`` simulations sets the standardization (on the first
        call) and is the validation set; the best weights by validation loss are
        kept. Simulations with NaN/inf get zero weight and are counted in
        ``History.num_invalid``. Model arguments are the posterior's fixed
        ``model_args`` / ``model_kwargs``.

        Args:
            rng_key: JAX PRNG key.
            num_steps: optimizer steps.
            batch_size: fresh simulations per step.
            steps_per_epoch: steps per jitted ``lax.scan`` (one history entry).
            learning_rate: peak learning rate (cosine decay over ``num_steps``).
            num_validation: size of the pilot / validation bank.
            patience: stop after this many epochs without improvement (None: run
                all steps).
            num_effective_simulations: with Bayesian weights, the ``N`` that
                scales ``KL(q(w) || p(w)) / N`` (default: every simulation the
                run will see, ``num_steps * batch_size``). Lower it when fresh
                simulations are near-duplicates of each other.
            progress: show a progress bar.
            checkpoint_dir: as for :meth:`fit` (an epoch is ``steps_per_epoch``).
            checkpoint_every: epochs between checkpoints.
            resume_from: as for :meth:`fit`.
            devices: as for :meth:`fit`; each device simulates its own share of
                every batch.
        """
        from numpyro_amortized import fitting

        with _restored_on_error(self):
            return fitting.fit_online(
                self,
                rng_key,
                num_steps,
                batch_size=batch_size,
                steps_per_epoch=steps_per_epoch,
                learning_rate=learning_rate,
                num_validation=num_validation,
                patience=patience,
                num_effective_simulations=num_effective_simulations,
                progress=progress,
                checkpoint_dir=checkpoint_dir,
                checkpoint_every=checkpoint_every,
                resume_from=resume_from,
                devices=devices,
            )

    def fit_elbo(
        self,
        rng_key: jax.Array,
        num_steps: int = 2_000,
        *,
        num_particles: int = 1,
        npe_weight: float = 0.0,
        elbo_weight: float = 1.0,
        batch_size: int = 64,
        steps_per_epoch: int = 100,
        learning_rate: float = 1e-4,
        num_validation: int = 512,
        patience: int | None = None,
        progress: bool = True,
    ) -> History:
        """Amortized VI: train by the ELBO (reverse KL) on fresh simulations.

        Needs a tractable likelihood (every latent site a target). Each step
        simulates ``batch_size`` datasets and minimizes
        ``elbo_weight * -ELBO(x) + npe_weight * NPE loss`` (see
        :mod:`numpyro_amortized.elbo`); typically used to fine-tune a posterior
        trained by :meth:`fit`, but an unfitted posterior is built first.

        Args:
            rng_key: JAX PRNG key.
            num_steps: optimizer steps.
            num_particles: posterior draws per dataset for the ELBO estimate.
            npe_weight: weight of the NPE loss (0: pure ELBO).
            elbo_weight: weight of the negative ELBO.
            batch_size: fresh datasets per step.
            steps_per_epoch: steps per jitted ``lax.scan`` (one history entry).
            learning_rate: peak learning rate (cosine decay over ``num_steps``).
            num_validation: size of the pilot / validation bank.
            patience: early-stopping patience in epochs (None: run all steps).
            progress: show a progress bar.

        Examples:
            >>> posterior.fit(key, num_simulations=1_000)  # doctest: +SKIP
            >>> history = posterior.fit_elbo(key, num_steps=2_000)  # doctest: +SKIP
        """
        from numpyro_amortized.vi import fit_elbo

        check_online_options(
            "fit_elbo",
            num_steps=num_steps,
            batch_size=batch_size,
            steps_per_epoch=steps_per_epoch,
            learning_rate=learning_rate,
            num_validation=num_validation,
            patience=patience,
            stacklevel=3,
        )
        check_count(num_particles, "num_particles", "fit_elbo")
        if self._fitted is None:
            check_model_structure(
                self.model, self.summary_net, self.model_args, self.model_kwargs
            )
        with _restored_on_error(self):
            return fit_elbo(
                self,
                rng_key,
                num_steps,
                num_particles=num_particles,
                npe_weight=npe_weight,
                elbo_weight=elbo_weight,
                batch_size=batch_size,
                steps_per_epoch=steps_per_epoch,
                learning_rate=learning_rate,
                num_validation=num_validation,
                patience=patience,
                progress=progress,
            )

    def as_guide(self, **options: Any) -> Any:
        """This posterior as a NumPyro guide for its model (SVI, ``Predictive``).

        Keyword options (``data``, ``nuisance_guide``, ``prefix``) go to
        :class:`~numpyro_amortized.AmortizedGuide`. With Bayesian weights
        (:attr:`is_bayesian`) it is a
        :class:`~numpyro_amortized.BayesianAmortizedGuide` (also ``kl_scale``),
        whose weights are latent sites: use it with
        ``guide.model_with_weight_prior()``.

        Examples:
            >>> guide = posterior.as_guide()  # doctest: +SKIP
            >>> svi = SVI(model, guide, adam(1e-4), Trace_ELBO())  # doctest: +SKIP
        """
        from numpyro_amortized.guides import AmortizedGuide

        if self.is_bayesian:
            from numpyro_amortized.bayesian_guide import BayesianAmortizedGuide

            return BayesianAmortizedGuide(self.model, self, **options)
        return AmortizedGuide(self.model, self, **options)

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Save the trained posterior to one file; reload with :func:`na.load`.

        Stores network specs, weights, standardization, site metadata, a
        fingerprint of the model and the training history (no pickles). The
        write is atomic; with ``overwrite=False`` an existing file is never
        replaced, even one a concurrent process creates meanwhile. See
        :func:`numpyro_amortized.io.save_posterior`.

        Args:
            path: file to write (e.g. ``"gauss.npa"``).
            overwrite: replace an existing file.

        Returns:
            The path written.

        Raises:
            FileExistsError: ``path`` exists and ``overwrite`` is False.
        """
        from numpyro_amortized.io import save_posterior

        return save_posterior(self, path, overwrite=overwrite)

    # ------------------------------------------------------------- inference
    def _data_arrays(
        self, data: dict, *, check: bool = True
    ) -> tuple[tuple[int, ...], jax.Array, Any]:
        f = self._require()
        if not isinstance(data, dict):
            raise TypeError(
                f"data must be a dict {{site: array}} with the observed sites "
                f"{list(f.layout.names)}; got {type(data).__name__}."
            )
        batch = f.layout.batch_shape(data)
        if check:
            f.layout.check_finite(data, self._observed_supports())
        x, mask = f.layout.to_network(data, len(batch))
        return batch, x, mask

    def _observed_supports(self) -> dict[str, Any]:
        """``{observed site: support}`` from the model, for checking data."""
        sites = self.model.describe(*self.model_args, **self.model_kwargs)
        return {n: sites[n].support for n in self.model.observed if n in sites}

    def _jit(self, name: str, fn: Callable, **kw) -> Callable:
        if name not in self._jitted:
            self._jitted[name] = jax.jit(fn, **kw)
        return self._jitted[name]

    def sample(
        self,
        rng_key: jax.Array,
        data: dict,
        num_samples: int = 1000,
        *,
        num_networks: int | None = None,
        chunk_size: int | None = None,
        progress: bool | None = None,
    ) -> dict[str, jax.Array]:
        """Posterior draws of the targets, in the constrained space.

        Args:
            rng_key: JAX PRNG key.
            data: ``{observed site: array}`` for one dataset, or with leading
                dataset axes (a batch of datasets).
            num_samples: draws per dataset.
            num_networks: with Bayesian network weights
                (:func:`~numpyro_amortized.networks.bayesian`), draw from this
                many networks sampled from the weight posterior; None uses the
                mean network.
            chunk_size: for a batch, process this many datasets at a time and
                return NumPy arrays in host memory (for batches whose draws do
                not fit on the device; see :mod:`numpyro_amortized.chunked`).
                The draws equal the unchunked ones.
            progress: progress bar over chunks (default: when there is more
                than one).

        Returns:
            ``{target: (*batch, num_samples, *site_shape)}``. In a batch, dataset
            ``b`` (flat index) gets exactly the draws of
            ``sample(jax.random.split(rng_key, B)[b], data_b, num_samples)``.
            With ``num_networks=K`` a leading network axis is added:
            ``(K, *batch, num_samples, *site_shape)``.

        Memory: a dataset's draws are made in blocks of at most
        :data:`~numpyro_amortized.chunked.DRAW_BLOCK` (65,536), so peak memory
        is about the output plus one block's intermediates per dataset, whatever
        ``num_samples`` is (10^7 draws of a 2-parameter model: 0.9 GB peak RSS
        instead of 3.7 GB). Up to one block the draws are those of one flow pass
        with the dataset's key; beyond, block ``i`` uses
        ``jax.random.fold_in(key, i)``. Bound the number of datasets per pass
        with ``chunk_size``.

        Raises:
            ValueError: ``num_samples`` is not a positive integer; data of the
                wrong shape, NaN/inf or beyond the float32 range, outside the
                site's support, empty, or a mask of the wrong shape (each message
                names the site).
            TypeError: complex, string or object data.

        Examples:
            >>> draws = posterior.sample(  # doctest: +SKIP
            ...     key, {"x": x_many}, 100, chunk_size=10_000)  # 10^6 datasets
        """
        _check_num_samples(num_samples)
        if num_networks is not None and chunk_size is not None:
            raise ValueError(
                "sample: num_networks and chunk_size cannot be combined yet; "
                "sample the networks in a loop over chunks of datasets."
            )
        if num_networks is not None:
            from numpyro_amortized.epistemic import sample_networks

            return sample_networks(self, rng_key, data, num_samples, num_networks)
        if chunk_size is not None:
            from numpyro_amortized.chunked import sample_in_chunks

            return sample_in_chunks(
                self,
                rng_key,
                data,
                num_samples,
                chunk_size=chunk_size,
                progress=progress,
            )
        f = self._require()
        batch, x, mask = self._data_arrays(data)
        graphdef, rest, space = f.graphdef, f.rest, f.space

        def draw(params, theta_std, x_std, key, x, mask, num_samples):
            net = nnx.merge(graphdef, params, rest)
            return draw_targets(net, space, theta_std, x_std, key, x, mask, num_samples)

        fn = self._jit(f"sample{len(batch)}", draw, static_argnames="num_samples")
        return fn(f.params, f.theta_std, f.x_std, rng_key, x, mask, num_samples)

    def log_prob(self, params: dict, data: dict) -> jax.Array:
        """``log q(params | data)`` in the constrained space, exact Jacobians.

        Args:
            params: ``{target: array}`` with shape ``(*batch, *extra, *site_shape)``
                where ``batch`` are the data's dataset axes (none for one dataset)
                and ``extra`` any further axes (e.g. draws).
            data: observed data as for :meth:`sample`.

        Returns:
            Log densities of shape ``(*batch, *extra)``; ``-inf`` where a value
            lies outside its site's support (as NumPyro's ``log_prob``).
        """
        f = self._require()
        batch, x, mask = self._data_arrays(data)
        graphdef, rest, space = f.graphdef, f.rest, f.space

        def density(net_params, theta_std, x_std, theta, x, mask):
            net = nnx.merge(graphdef, net_params, rest)
            ctx = net.context(x_std(x), mask)
            u, log_det = space.unconstrain(theta)
            extra = u.ndim - ctx.ndim
            ctx = ctx.reshape(*ctx.shape[:-1], *(1,) * max(extra, 0), ctx.shape[-1])
            lp = net.flow.log_prob(theta_std(u), ctx)
            lp = lp - theta_std.log_scale + log_det
            return jnp.where(space.in_support(theta), lp, -jnp.inf)

        fn = self._jit("log_prob", density)
        return fn(f.params, f.theta_std, f.x_std, params, x, mask)

    def summarize(self, data: dict) -> jax.Array:
        """The learned summary statistics of ``data``: ``(*batch, summary_dim)``.

        Without a summary network this is the standardized flat observation.
        """
        f = self._require()
        _, x, mask = self._data_arrays(data)
        graphdef, rest = f.graphdef, f.rest

        def summ(params, x_std, x, mask):
            net = nnx.merge(graphdef, params, rest)
            xs = x_std(x)
            return xs if net.summary is None else net.summary(xs, mask=mask)

        return self._jit("summarize", summ)(f.params, f.x_std, x, mask)

    def to_inference_data(
        self,
        rng_key: jax.Array,
        data: dict,
        num_samples: int = 1000,
        *,
        num_networks: int | None = None,
    ) -> Any:
        """Draws as ``arviz.InferenceData`` (``posterior`` + ``observed_data``).

        A batch of datasets gets a ``dataset`` dimension; site dimensions are named
        after their plates. With ``num_networks=K`` (Bayesian weights) the draws
        of each sampled network get a ``network`` dimension (see :meth:`sample`).
        """
        from numpyro_amortized.inference_data import posterior_to_inference_data

        draws = self.sample(rng_key, data, num_samples, num_networks=num_networks)
        batch = self._require().layout.batch_shape(data)
        sites = self.model.describe(*self.model_args, **self.model_kwargs)
        observed = {n: data[n] for n in self.model.observed}
        for n in self.model.observed:
            if mask_key(n) in data:
                observed[mask_key(n)] = data[mask_key(n)]
        return posterior_to_inference_data(
            draws, observed, sites, len(batch), network_axis=num_networks is not None
        )

    # --------------------------------------------------- Bayesian weights
    def sample_network(self, rng_key: jax.Array) -> AmortizedPosterior:
        """One network drawn from the weight posterior, as a point-estimate
        posterior (plain specs: deterministic, savable).

        Needs Bayesian weights (:func:`~numpyro_amortized.networks.bayesian`).

        Examples:
            >>> one = posterior.sample_network(jax.random.key(0))  # doctest: +SKIP
            >>> one.sample(jax.random.key(1), {"x": x_obs}, 100)  # doctest: +SKIP
        """
        from numpyro_amortized.epistemic import sample_network

        return sample_network(self, rng_key)

    def epistemic(
        self,
        rng_key: jax.Array,
        data: dict,
        *,
        num_networks: int = 20,
        num_samples: int = 500,
    ) -> Any:
        """How much networks drawn from the weight posterior disagree on ``data``.

        Returns an :class:`~numpyro_amortized.epistemic.EpistemicSummary`: per
        network posterior means and sds, their spread across networks, and the
        spread of the means relative to the posterior sd. Larger for data unlike
        the training simulations; smaller with more training simulations.

        Examples:
            >>> summary = posterior.epistemic(key, {"x": x_obs})  # doctest: +SKIP
            >>> summary.relative_spread["mu"]  # doctest: +SKIP
        """
        from numpyro_amortized.epistemic import epistemic_summary

        return epistemic_summary(
            self, rng_key, data, num_networks=num_networks, num_samples=num_samples
        )

    # ------------------------------------------------------------ diagnostics
    def diagnose(
        self,
        rng_key: jax.Array,
        *,
        num_datasets: int = 200,
        num_samples: int = 500,
        alpha: float = 0.05,
        path: Any = None,
    ) -> Any:
        """SBC, coverage, recovery and z-score/contraction on fresh simulations.

        Delegates to :func:`numpyro_amortized.diagnostics.diagnose`; with ``path``
        a figure panel (loss, SBC ECDF, coverage, recovery, z-score vs
        contraction, a table) is saved there.

        Examples:
            >>> report = posterior.diagnose(  # doctest: +SKIP
            ...     jax.random.key(0), num_datasets=200, path="diagnostics.png")
            >>> print(report.table())  # doctest: +SKIP
        """
        from numpyro_amortized.diagnostics import diagnose

        return diagnose(
            rng_key,
            self,
            num_datasets=num_datasets,
            num_samples=num_samples,
            alpha=alpha,
            path=path,
        )


def _is_set_spec(spec: Any) -> bool:
    spec = spec.spec if isinstance(spec, nets.BayesianNetwork) else spec
    return isinstance(spec, nets.DeepSet | nets.SetTransformer | nets.TimeSeriesNetwork)


def draw_targets(
    net: Any,
    space: LatentSpace,
    theta_std: Standardizer,
    x_std: Standardizer,
    key: jax.Array,
    x: jax.Array,
    mask: Any,
    num_samples: int,
) -> dict[str, jax.Array]:
    """Draws of the targets from an amortizer network (body of ``sample``)."""
    ctx = net.context(x_std(x), mask)
    batch = ctx.shape[:-1]
    if not batch:
        v = sample_flow(net.flow, key, ctx, num_samples)  # (S, D)
    else:  # dataset b (flat index) uses split(key, B)[b]
        flat_ctx = ctx.reshape(-1, ctx.shape[-1])
        keys = jax.random.split(key, flat_ctx.shape[0])
        v = jax.vmap(lambda k, c: sample_flow(net.flow, k, c, num_samples))(
            keys, flat_ctx
        )  # (B, S, D)
        v = v.reshape(*batch, num_samples, v.shape[-1])
    return space.constrain(theta_std.inverse(v))[0]


@contextlib.contextmanager
def _restored_on_error(post: AmortizedPosterior):
    """A fit that raises (divergence, a bad bank, Ctrl-C) leaves the posterior as
    it was before the fit: on a first fit, not fitted, rather than holding the
    untrained networks it had just built."""
    before, history = post._fitted, post.history
    try:
        yield
    except BaseException:
        post._fitted, post.history = before, history
        raise


def _check_num_samples(num_samples: Any) -> None:
    """Raise unless ``num_samples`` is a positive integer."""
    if (
        isinstance(num_samples, bool)
        or not isinstance(num_samples, int | np.integer)
        or num_samples < 1
    ):
        raise ValueError(
            f"num_samples must be a positive integer (draws per dataset), got "
            f"{num_samples!r}."
        )
