"""Checks of fit options, simulation banks and model structure, before training.

Pure functions that raise a ``ValueError`` / ``TypeError`` naming the argument
(or site), what it got and what is valid, instead of letting a bad input fail
deep inside JAX (a ``ZeroDivisionError``, a gather or ``dot_general`` error) or,
worse, train silently on something that gives a wrong posterior.

Model structure the amortizer does not handle yet is refused here too: targets
that sit in the plate a pooling summary network pools over (per-group,
hierarchical latents; every group would get the same posterior), and a set of
observations given to a summary network that takes one flat vector.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from numpyro_amortized import networks as nets
from numpyro_amortized.data import ObservationLayout
from numpyro_amortized.sites import SiteInfo
from numpyro_amortized.varying import MASK_SUFFIX, check_arguments_seen

__all__ = [
    "MIN_VALIDATION_ROWS",
    "check_bank_for_model",
    "check_count",
    "check_fit_call",
    "check_fraction",
    "check_learning_rate",
    "check_model_structure",
    "check_offline_options",
    "check_online_options",
    "check_simulations",
    "check_structure",
    "check_training_split",
    "check_varying_for_model",
    "resolve_summary",
]

MIN_VALIDATION_ROWS = 50
"""Fewer validation rows than this give a warning: the validation loss of so few
rows is too noisy to pick the best epoch or stop early on."""


# ------------------------------------------------------------------ options
def check_count(
    value: Any, name: str, where: str, *, minimum: int = 1, allow_none: bool = False
) -> None:
    """Raise unless ``value`` is an integer ``>= minimum`` (or None if allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        none = " or None" if allow_none else ""
        raise TypeError(
            f"{where}: {name} must be an integer >= {minimum}{none}; got {value!r} "
            f"({type(value).__name__})."
        )
    if value < minimum:
        raise ValueError(f"{where}: {name} must be >= {minimum}; got {value}.")


def check_fraction(value: Any, name: str, where: str) -> None:
    """Raise unless ``value`` is a number in ``[0, 1)``."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        raise TypeError(
            f"{where}: {name} must be a number in [0, 1); got {value!r} "
            f"({type(value).__name__})."
        )
    if not 0 <= value < 1:  # False for NaN
        raise ValueError(
            f"{where}: {name} must lie in [0, 1) (the share of simulations held out "
            f"for validation; 0 disables early stopping); got {value}."
        )


def check_learning_rate(value: Any, where: str) -> None:
    """Raise unless ``value`` is a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        raise TypeError(
            f"{where}: learning_rate must be a positive number; got {value!r} "
            f"({type(value).__name__})."
        )
    if not (math.isfinite(float(value)) and value > 0):
        raise ValueError(
            f"{where}: learning_rate must be a finite number > 0 (typically 1e-4 "
            f"to 1e-2); got {value}."
        )


def check_offline_options(
    *,
    num_simulations: Any,
    num_rounds: Any,
    batch_size: Any,
    max_epochs: Any,
    learning_rate: Any,
    validation_fraction: Any,
    patience: Any,
    checkpoint_every: Any,
    chunk_size: Any,
) -> None:
    """Check the arguments of ``AmortizedPosterior.fit``."""
    where = "fit"
    check_count(num_simulations, "num_simulations", where, allow_none=True)
    check_count(num_rounds, "num_rounds", where)
    check_count(batch_size, "batch_size", where, allow_none=True)
    check_count(max_epochs, "max_epochs", where)
    check_learning_rate(learning_rate, where)
    check_fraction(validation_fraction, "validation_fraction", where)
    check_count(patience, "patience", where, allow_none=True)
    check_count(checkpoint_every, "checkpoint_every", where)
    check_count(chunk_size, "chunk_size", where, allow_none=True)


def check_online_options(
    where: str,
    *,
    num_steps: Any,
    batch_size: Any,
    steps_per_epoch: Any,
    learning_rate: Any,
    num_validation: Any,
    patience: Any,
    stacklevel: int = 4,
) -> None:
    """Check the arguments shared by ``fit_online`` and ``fit_elbo``; warn when
    ``num_validation`` is too small to validate on (``stacklevel`` points the
    warning at the user's call)."""
    check_count(num_steps, "num_steps", where)
    check_count(batch_size, "batch_size", where)
    check_count(steps_per_epoch, "steps_per_epoch", where)
    check_learning_rate(learning_rate, where)
    check_count(num_validation, "num_validation", where)
    check_count(patience, "patience", where, allow_none=True)
    if num_validation < MIN_VALIDATION_ROWS:
        warnings.warn(
            f"{where}: num_validation={num_validation} simulations are the "
            "validation set that picks the best weights; the validation loss of "
            f"fewer than {MIN_VALIDATION_ROWS} rows is too noisy for that. Use "
            f"num_validation >= {MIN_VALIDATION_ROWS} (the default is fine).",
            UserWarning,
            stacklevel=stacklevel,
        )


def check_training_split(
    num_rows: int,
    num_val: int,
    validation_fraction: float,
    batch_size: int | None,
    where: str = "fit",
) -> None:
    """Check how a bank of ``num_rows`` splits into training and validation rows.

    Raises when no training row is left; warns when ``batch_size`` exceeds the
    training rows (it is lowered to their number) and when a validation set is
    asked for but has fewer than :data:`MIN_VALIDATION_ROWS` rows.
    """
    num_train = num_rows - num_val
    if num_train < 1:
        raise ValueError(
            f"{where}: no training rows left: {num_rows} simulation(s) with "
            f"validation_fraction={validation_fraction} hold out {num_val} for "
            "validation. Simulate more or lower validation_fraction."
        )
    if batch_size is not None and batch_size > num_train:
        warnings.warn(
            f"{where}: batch_size={batch_size} is larger than the {num_train} "
            f"training rows ({num_rows} simulations minus {num_val} for "
            f"validation); using batch_size={num_train}. Simulate more or pass a "
            "smaller batch_size.",
            UserWarning,
            stacklevel=5,
        )
    if validation_fraction > 0 and num_val < MIN_VALIDATION_ROWS:
        need = math.ceil(MIN_VALIDATION_ROWS / validation_fraction)
        warnings.warn(
            f"{where}: the validation set has only {num_val} row(s) "
            f"(validation_fraction={validation_fraction} of {num_rows} "
            "simulations); its loss is too noisy to pick the best epoch or to "
            f"stop early. Simulate at least {need} (for {MIN_VALIDATION_ROWS} "
            "validation rows), raise validation_fraction, or pass "
            "validation_fraction=0 to train all max_epochs without validation.",
            UserWarning,
            stacklevel=5,
        )


# ------------------------------------------------------------- simulations
def _expected(site: SiteInfo, set_axis: int, plate: str) -> str:
    shape = str(site.shape)
    if set_axis >= 0:
        shape += f" (axis {set_axis}, the '{plate}' plate, may have any size)"
    return shape


def _shape_ok(got: tuple[int, ...], want: tuple[int, ...], free_axis: int) -> bool:
    return len(got) == len(want) and all(
        g == w or i == free_axis for i, (g, w) in enumerate(zip(got, want, strict=True))
    )


def check_simulations(
    simulations: Any,
    sites: Mapping[str, SiteInfo],
    targets: Sequence[str],
    layout: ObservationLayout,
    model_name: str = "model",
) -> None:
    """Check a user's bank ``{site: array}`` for ``fit(simulations=...)``.

    Every target and observed site must be present, with one leading simulation
    axis of the same length everywhere and the model's shape for one simulation
    (an observed set may have any number of observations); masks
    (``"<site>_mask"``) must match their site; a site may not be entirely
    NaN/inf; keys that are neither sample sites of the model nor masks are
    refused (a misspelled mask would otherwise be ignored).

    Raises:
        TypeError: not a dict, or a non-numeric site.
        ValueError: anything else above; the message names the site, its shape
            and the model's.
    """
    if not isinstance(simulations, Mapping):
        raise TypeError(
            "fit(simulations=...) takes a dict {site: array} with a leading "
            "simulation axis (e.g. model.simulate(...) or na.load_simulations(...)) "
            f"or a DiskBank; got {type(simulations).__name__}."
        )
    needed = list(dict.fromkeys([*targets, *layout.names]))
    expected = ", ".join(f"'{n}': {sites[n].shape}" for n in needed)
    missing = [n for n in needed if n not in simulations]
    if missing:
        raise ValueError(
            f"fit(simulations=...) lacks site(s) {missing}; it has keys "
            f"{sorted(simulations)}. A bank for model '{model_name}' needs every "
            f"target and observed site, with shapes per simulation {{{expected}}}."
        )
    masks = {n + MASK_SUFFIX for n in sites}
    unknown = [k for k in simulations if k not in sites and k not in masks]
    if unknown:
        raise ValueError(
            f"fit(simulations=...) has key(s) {unknown} that are neither sample "
            f"sites of model '{model_name}' ({list(sites)}) nor padding masks "
            f"('<site>{MASK_SUFFIX}'). Remove them or fix their names: a "
            "misspelled site or mask would be ignored."
        )
    arrays = {k: np.asarray(v) for k, v in simulations.items() if k in needed}
    arrays |= {k: np.asarray(v) for k, v in simulations.items() if k in masks}
    for k, v in arrays.items():
        if v.dtype.kind not in "biuf":
            raise TypeError(
                f"fit(simulations=...): site '{k}' has dtype {v.dtype}; banks hold "
                "real numbers (bool, integer or float)."
            )
        if v.ndim == 0:
            raise ValueError(
                f"fit(simulations=...): site '{k}' is a scalar; every entry needs "
                "a leading simulation axis."
            )
    lengths = {k: v.shape[0] for k, v in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(
            "fit(simulations=...): sites have different numbers of simulations "
            f"(leading axis): {lengths}. Every site needs one row per simulation."
        )
    if not next(iter(lengths.values())):
        raise ValueError(
            "fit(simulations=...) has 0 simulations; simulate some first "
            "(model.simulate or fit(num_simulations=...))."
        )
    axes = dict(zip(layout.names, layout.set_axes, strict=True))
    for n in needed:
        got = arrays[n].shape[1:]
        axis = axes.get(n, -1) if n not in targets else -1
        if not _shape_ok(got, sites[n].shape, axis):
            raise ValueError(
                f"fit(simulations=...): site '{n}' has shape {got} per simulation "
                f"(array {arrays[n].shape}); model '{model_name}' gives "
                f"{_expected(sites[n], axis, layout.plate)}. Simulate the bank "
                "with the same model arguments (model_args / model_kwargs)."
            )
        m = arrays.get(n + MASK_SUFFIX)
        if m is not None and arrays[n].shape[: m.ndim] != m.shape:
            raise ValueError(
                f"fit(simulations=...): mask '{n}{MASK_SUFFIX}' has shape {m.shape} "
                f"but site '{n}' has shape {arrays[n].shape}; a mask covers the "
                "site's leading axes."
            )
        if arrays[n].dtype.kind == "f" and arrays[n].size:
            if not np.isfinite(arrays[n]).any():
                raise ValueError(
                    f"fit(simulations=...): site '{n}' is NaN/inf in every "
                    "simulation; there is nothing to train on. Check how the bank "
                    "was made."
                )


# --------------------------------------------------------------- structure
def resolve_summary(summary_net: Any, layout: ObservationLayout) -> Any:
    """The summary network used: ``summary_net``, or ``DeepSet()`` for a set."""
    if summary_net is None and layout.is_set:
        return nets.DeepSet()
    return summary_net


def _base_spec(spec: Any) -> Any:
    return spec.spec if isinstance(spec, nets.BayesianNetwork) else spec


def check_structure(
    sites: Mapping[str, SiteInfo],
    targets: Sequence[str],
    layout: ObservationLayout,
    summary_spec: Any,
    model_name: str = "model",
) -> None:
    """Refuse model structure the amortizer would answer wrongly.

    * A target in the plate that a permutation-invariant summary (``DeepSet``,
      ``SetTransformer``) pools over: the summary cannot tell the plate's
      members apart, so each member's target would get the same posterior.
    * A flat summary (``MLP``) for a set of observations.

    Raises:
        ValueError: naming the site and what works instead.
    """
    spec = _base_spec(summary_spec)
    if not layout.is_set:
        return
    if isinstance(spec, nets.MLP):
        raise ValueError(
            f"summary_net={summary_spec!r} takes one flat vector per dataset, but "
            f"the observed sites {list(layout.names)} of model '{model_name}' are "
            f"a set of observations over the plate '{layout.plate}'. Use a set "
            "summary (summary_net=None picks DeepSet(); or SetTransformer()), or, "
            "for a fixed number of observations read in order, observe the data "
            "as one vector site without the plate (.to_event(1)) and keep MLP()."
        )
    if not isinstance(spec, nets.DeepSet | nets.SetTransformer):
        return
    for t in targets:
        plate = next((p for p in sites[t].plates if p.name == layout.plate), None)
        if plate is None:
            continue
        raise ValueError(
            f"Target '{t}' of model '{model_name}' sits in the plate "
            f"'{plate.name}' (size {plate.size}), the plate that "
            f"summary_net={type(spec).__name__} pools the observed sites "
            f"{list(layout.names)} over. A pooling summary cannot tell the plate's "
            f"members apart, so every '{t}[j]' would get the same posterior. "
            "Per-group (hierarchical) targets inside the data's plate are not "
            "supported yet (a non-centred reparameterisation does not change "
            f"this). What works now: sample '{t}' outside the plate as one vector "
            f"site (e.g. dist.Normal(loc, scale).expand([{plate.size}])"
            ".to_event(1)) and observe the data as a vector site too "
            "(.to_event(1), no plate), so they are read in order; or infer only "
            f"the global sites, AmortizedPosterior(model, targets=[...]) without "
            f"'{t}', which marginalizes it as nuisance."
        )


def check_model_structure(
    model: Any, summary_net: Any, model_args: Sequence, model_kwargs: dict
) -> None:
    """:func:`check_structure` for an ``AmortizedModel`` and its arguments (run
    before simulating, so that a refused model fails fast)."""
    sites = model.describe(*model_args, **model_kwargs)
    targets = model.target_names(*model_args, **model_kwargs)
    layout = ObservationLayout.from_sites([sites[n] for n in model.observed])
    name = getattr(model.fn, "__name__", "model")
    check_structure(sites, targets, layout, resolve_summary(summary_net, layout), name)


def check_bank_for_model(
    simulations: Any, model: Any, model_args: Sequence, model_kwargs: dict
) -> None:
    """:func:`check_simulations` against an ``AmortizedModel`` and its arguments."""
    sites = model.describe(*model_args, **model_kwargs)
    targets = model.target_names(*model_args, **model_kwargs)
    layout = ObservationLayout.from_sites([sites[n] for n in model.observed])
    name = getattr(model.fn, "__name__", "model")
    check_simulations(simulations, sites, targets, layout, name)


def check_varying_for_model(
    rng_key: jax.Array,
    sample_kwargs: Any,
    model: Any,
    model_args: Sequence,
    model_kwargs: dict,
) -> None:
    """Refuse ``sample_kwargs`` arguments that the networks would not see
    (:func:`numpyro_amortized.varying.check_arguments_seen`)."""

    def observed_shapes(drawn: dict) -> tuple:
        sites = model.describe(*model_args, **{**model_kwargs, **drawn})
        return tuple(sites[n].shape for n in model.observed)

    check_arguments_seen(
        rng_key, sample_kwargs, observed_shapes, observed=model.observed
    )


def check_fit_call(
    model: Any,
    summary_net: Any,
    model_args: Sequence,
    model_kwargs: dict,
    rng_key: jax.Array,
    *,
    first_fit: bool,
    simulations: Any,
    disk_bank: bool,
    sample_kwargs: Any,
    options: dict[str, Any],
) -> None:
    """Every check of ``AmortizedPosterior.fit`` that runs before simulating:
    the options (:func:`check_offline_options`), the bank (empty, malformed),
    the model's structure (on the first fit) and the ``sample_kwargs`` the
    networks would not see."""
    check_offline_options(**options)
    if disk_bank and len(simulations) == 0:
        raise ValueError(f"fit(simulations={simulations!r}): the bank is empty.")
    if simulations is not None and not disk_bank:
        check_bank_for_model(simulations, model, model_args, model_kwargs)
    if first_fit:
        check_model_structure(model, summary_net, model_args, model_kwargs)
    if sample_kwargs is not None and simulations is None:
        check_varying_for_model(
            jax.random.fold_in(rng_key, 2**30),
            sample_kwargs,
            model,
            model_args,
            model_kwargs,
        )
