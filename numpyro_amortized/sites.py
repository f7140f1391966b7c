"""Site metadata: trace a NumPyro model once and describe every sample site.

The tracer runs the model under ``handlers.seed`` + ``handlers.trace`` and turns each
sample site into a :class:`SiteInfo`, a small immutable record of what the rest of
the library needs: the value shape, event shape, support, whether it is discrete,
whether it is observed, and the plates it sits in.
"""

from __future__ import annotations

import linecache
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.distributions import constraints
from numpyro.primitives import Messenger

__all__ = [
    "PlateInfo",
    "SiteInfo",
    "ModelTraceError",
    "base_distribution",
    "latent_plate_error",
    "trace_sites",
    "support_repr",
]


class ModelTraceError(RuntimeError):
    """Raised when running the model to trace it fails; names the failing site."""


class PlateInfo(NamedTuple):
    """A plate a site sits in.

    Attributes:
        name: the plate's name.
        dim: the (negative) batch dimension the plate occupies.
        size: the plate's full size.
    """

    name: str
    dim: int
    size: int


class SiteInfo(NamedTuple):
    """What the library knows about one sample site of a model.

    Attributes:
        name: site name.
        shape: shape of one draw of the site's value (batch + event shape).
        event_shape: the distribution's event shape.
        dtype: dtype name of the value (e.g. ``"float32"``).
        support: the distribution's support (a numpyro constraint).
        is_discrete: whether the support is discrete.
        is_observed: whether the site is one of the model's declared observed sites.
        plates: the plates the site sits in, outermost first.
    """

    name: str
    shape: tuple[int, ...]
    event_shape: tuple[int, ...]
    dtype: str
    support: constraints.Constraint
    is_discrete: bool
    is_observed: bool
    plates: tuple[PlateInfo, ...]

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """The part of ``shape`` that is not ``event_shape``."""
        return self.shape[: len(self.shape) - len(self.event_shape)]

    @property
    def size(self) -> int:
        """Number of scalar elements in one draw."""
        return int(np.prod(self.shape, dtype=np.int64))

    def describe(self) -> dict[str, Any]:
        """A JSON-serializable description (support as its ``repr``)."""
        return {
            "name": self.name,
            "shape": list(self.shape),
            "event_shape": list(self.event_shape),
            "dtype": self.dtype,
            "support": support_repr(self.support),
            "is_discrete": self.is_discrete,
            "is_observed": self.is_observed,
            "plates": [list(p) for p in self.plates],
        }


def support_repr(support: constraints.Constraint) -> str:
    """A stable text form of a support, e.g. ``"Interval(lower_bound=0.0, ...)"``."""
    return repr(support)


class _SiteRecorder(Messenger):
    """Remembers which sample site is being processed, for error messages."""

    def __init__(self, fn: Callable | None = None):
        self.current: str | None = None
        self.current_fn: Any = None
        self.done: list[tuple[str, tuple[int, ...]]] = []
        super().__init__(fn)

    def process_message(self, msg: dict) -> None:
        if msg["type"] == "sample":
            self.current = msg["name"]
            self.current_fn = msg["fn"]

    def postprocess_message(self, msg: dict) -> None:
        if msg["type"] == "sample":
            self.done.append((msg["name"], tuple(np.shape(msg["value"]))))
            self.current = None


def _arg_shapes(args: Sequence, kwargs: dict) -> str:
    def fmt(v: Any) -> str:
        return f"array{tuple(np.shape(v))}" if hasattr(v, "shape") else repr(v)

    parts = [fmt(a) for a in args] + [f"{k}={fmt(v)}" for k, v in kwargs.items()]
    return ", ".join(parts)


def _model_line(fn: Callable, error: BaseException) -> str:
    """`` at file:line: source`` of the model's frame that raised, if found."""
    code = getattr(fn, "__code__", None)
    found = None
    for frame, lineno in traceback.walk_tb(error.__traceback__):
        if frame.f_code is code:
            found = (frame.f_code.co_filename, lineno)
    if found is None:
        return ""
    src = linecache.getline(*found).strip()
    return f" (at {found[0]}:{found[1]}: {src})"


def _sample_site_in_traceback(error: BaseException) -> str | None:
    """Name of the ``numpyro.sample`` call the error came from, if any."""
    name = None
    for frame, _ in traceback.walk_tb(error.__traceback__):
        if frame.f_code is numpyro.primitives.sample.__code__:
            name = frame.f_locals.get("name")
    return name


def base_distribution(d: Any) -> Any:
    """``d`` without its wrappers (``expand``, ``to_event``, ``mask``, ...)."""
    while hasattr(d, "base_dist"):
        d = d.base_dist
    return d


def _improper_error(model: str, site: str, d: Any) -> ModelTraceError:
    return ModelTraceError(
        f"Site '{site}' of model '{model}' has an improper prior "
        f"({type(d).__name__}, support {d.support!r}), which cannot be sampled. "
        "Amortized inference simulates from the prior, so every latent site needs "
        "a proper distribution: give it one (e.g. dist.Normal(0, 10) or "
        "dist.Uniform(low, high) for a bounded support). An observed site with "
        "an improper distribution cannot be simulated either."
    )


def run_trace(fn: Callable, rng_key: jax.Array, args: Sequence, kwargs: dict) -> dict:
    """Run ``fn`` once under seed + trace; on failure raise :class:`ModelTraceError`.

    The error names the site being processed (or the last site completed) and the
    shapes of all sites traced so far, so a shape mismatch is easy to find.
    """
    recorder = _SiteRecorder(fn)
    try:
        # Argument validation off: one unlucky draw (e.g. NaN from a simulator that
        # fails for some parameters) must not stop the description; such
        # simulations are dropped later, as they are inside jit.
        with numpyro.validation_enabled(False):
            return handlers.trace(handlers.seed(recorder, rng_key)).get_trace(
                *args, **kwargs
            )
    except Exception as e:
        name = getattr(fn, "__name__", repr(fn))
        current = _sample_site_in_traceback(e) or recorder.current
        base = base_distribution(recorder.current_fn)
        if isinstance(e, NotImplementedError) and isinstance(
            base, dist.ImproperUniform
        ):
            raise _improper_error(name, str(recorder.current), base) from e
        where = (
            f"while sampling site '{current}'"
            if current is not None
            else (
                f"after site '{recorder.done[-1][0]}'"
                if recorder.done
                else "before its first sample site"
            )
        )
        done = ", ".join(f"'{n}' {s}" for n, s in recorder.done) or "none"
        where += _model_line(fn, e)
        raise ModelTraceError(
            f"Running model '{name}({_arg_shapes(args, kwargs)})' failed {where}: "
            f"{type(e).__name__}: {e}\nSites traced before the failure (name, shape): "
            f"{done}.\nCheck the shapes of the distributions' parameters and plates "
            "at that site."
        ) from e


def sites_from_trace(trace: dict, observed: Sequence[str]) -> dict[str, SiteInfo]:
    """Describe every sample site of a trace (in trace order)."""
    out: dict[str, SiteInfo] = {}
    for name, site in trace.items():
        if site["type"] != "sample":
            continue
        fn = site["fn"]
        value = site["value"]
        support = fn.support
        plates = tuple(
            PlateInfo(f.name, int(f.dim), int(f.size))
            for f in site["cond_indep_stack"]
            if f.dim is not None
        )
        out[name] = SiteInfo(
            name=name,
            shape=tuple(int(d) for d in np.shape(value)),
            event_shape=tuple(int(d) for d in fn.event_shape),
            dtype=str(np.asarray(value).dtype)
            if not hasattr(value, "dtype")
            else str(value.dtype),
            support=support,
            is_discrete=bool(support.is_discrete),
            is_observed=name in observed,
            plates=plates,
        )
    return out


def trace_sites(
    fn: Callable,
    observed: Sequence[str],
    args: Sequence = (),
    kwargs: dict | None = None,
    *,
    rng_key: jax.Array | None = None,
) -> tuple[dict, dict[str, SiteInfo]]:
    """Trace ``fn(*args, **kwargs)`` once and describe its sample sites.

    Args:
        fn: a NumPyro model.
        observed: names of the sites that are data.
        args: positional model arguments.
        kwargs: keyword model arguments.
        rng_key: key for the one run (default ``jax.random.key(0)``).

    Returns:
        ``(trace, sites)``: the raw NumPyro trace and ``{name: SiteInfo}``.
    """
    kwargs = {} if kwargs is None else kwargs
    rng_key = jax.random.key(0) if rng_key is None else rng_key
    trace = run_trace(fn, rng_key, args, kwargs)
    return trace, sites_from_trace(trace, observed)


def _plate_in_traceback(error: BaseException) -> str | None:
    """Name of the ``numpyro.plate`` being made when ``error`` was raised."""
    name = None
    for frame, _ in traceback.walk_tb(error.__traceback__):
        if frame.f_code is numpyro.primitives.plate.__init__.__code__:
            name = frame.f_locals.get("name")
    return name


def latent_plate_error(
    error: BaseException, model: str, trace: dict, observed: Sequence[str]
) -> ValueError | None:
    """A clear error for a plate whose size is a latent site's value.

    Inside ``jit`` such a size is a tracer and NumPyro fails with a raw
    ``ConcretizationTypeError``. ``trace`` is one run of the model (outside
    ``jit``), used to name the latent site(s) whose value equals the size.

    Returns:
        The error to raise, or None when ``error`` is not of that kind.
    """
    if not isinstance(
        error,
        jax.errors.ConcretizationTypeError | jax.errors.TracerIntegerConversionError,
    ):
        return None
    plate = _plate_in_traceback(error)
    if plate is None:
        return None
    size = next(
        (
            f.size
            for site in trace.values()
            for f in site.get("cond_indep_stack", ())
            if f.name == plate
        ),
        None,
    )
    candidates = [
        n
        for n, site in trace.items()
        if site["type"] == "sample"
        and n not in observed
        and np.ndim(site["value"]) == 0
        and size is not None
        and float(site["value"]) == size
    ]
    which = (
        f"latent site {candidates[0]!r}"
        if len(candidates) == 1
        else (
            f"one of the latent sites {candidates}" if candidates else "a latent site"
        )
    )
    return ValueError(
        f"The size of plate '{plate}' in model '{model}' comes from {which}, a "
        "random value: simulation compiles one program for many simulations, so "
        "plate sizes (and other shapes) must be fixed Python integers. What works: "
        "make the size a model argument (e.g. def model(n_obs=50, ...): with "
        "numpyro.plate('obs', n_obs)) and vary it per batch of simulations with "
        "fit(..., sample_kwargs=lambda key: {'n_obs': ...}) or "
        "model.simulate(..., sample_kwargs=...); datasets are then padded and masked."
    )
