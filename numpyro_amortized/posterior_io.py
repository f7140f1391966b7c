"""An ``AmortizedPosterior`` <-> the header content and arrays of a saved file.

:func:`encode_posterior` and :func:`decode_posterior` are the two halves behind
``posterior.save`` / ``na.load`` (the file container itself is :mod:`.io`).
A posterior loaded without its model gets a :class:`DetachedModel`: it answers
site questions from the file and refuses to simulate.
"""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from numpyro_amortized.amortizer import build_amortizer
from numpyro_amortized.bank import _signature
from numpyro_amortized.codec import (
    TreeMismatchError,
    decode_layout,
    decode_sites,
    decode_space,
    encode_layout,
    encode_sites,
    encode_space,
    tree_from_arrays,
    tree_to_arrays,
)
from numpyro_amortized.data import Standardizer
from numpyro_amortized.history import History
from numpyro_amortized.io import (
    AmortizerFileError,
    ModelRequiredError,
    check_model,
    model_fingerprint,
)
from numpyro_amortized.model import AmortizedModel
from numpyro_amortized.networks.registry import network_config, network_from_config

if TYPE_CHECKING:
    from numpyro_amortized.posterior import AmortizedPosterior, _Fitted

__all__ = [
    "DetachedModel",
    "decode_posterior",
    "encode_posterior",
    "fitted_from",
    "history_from_dict",
]


class DetachedModel(AmortizedModel):
    """Stands in for the model of a posterior loaded without it.

    It knows the saved sites (so shapes, supports and InferenceData dimensions
    work) and raises :class:`~numpyro_amortized.io.ModelRequiredError` when asked
    to run or simulate.
    """

    def __init__(self, path: Any, content: dict[str, Any]):
        meta = content["model"]
        message = (
            f"This posterior was loaded from {path} without its model, so it cannot "
            f"run model '{meta['name']}'. Load it with na.load(path, model=model) "
            "to simulate or train."
        )

        def fn(*args: Any, **kwargs: Any) -> None:
            raise ModelRequiredError(message)

        fn.__name__ = meta["name"]
        super().__init__(fn, meta["observed"], meta["targets"])
        self.content = content
        self._message = message
        self._sites = decode_sites(content["sites"])

    def describe(self, *args: Any, **kwargs: Any) -> dict:
        """The saved site metadata (arguments are ignored)."""
        return self._sites

    def simulate(self, *args: Any, **kwargs: Any) -> Any:
        """Not available: raises :class:`~numpyro_amortized.io.ModelRequiredError`."""
        raise ModelRequiredError(self._message)


# -------------------------------------------------------------------- encode
def encode_posterior(
    post: AmortizedPosterior, params: Any = None, fingerprint: Any = False
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Header content and arrays of a fitted posterior (``params`` overrides the
    weights, e.g. the best ones during training; ``fingerprint`` the model's
    :func:`~numpyro_amortized.io.model_fingerprint`, computed when False)."""
    f = post._require()
    arrays, p_index = tree_to_arrays("params", f.params if params is None else params)
    rest_arrays, r_index = tree_to_arrays("rest", f.rest)
    arrays.update(rest_arrays)
    for name, std in (("theta_std", f.theta_std), ("x_std", f.x_std)):
        arrays[f"{name}/mean"] = np.asarray(std.mean)
        arrays[f"{name}/std"] = np.asarray(std.std)
    model = post.model
    if isinstance(model, DetachedModel):
        keep = ("model", "signature", "sites")
        meta = {k: model.content[k] for k in keep}
    else:
        args, kwargs = post.model_args, post.model_kwargs
        if fingerprint is False:
            fingerprint = model_fingerprint(model, tuple(args), dict(kwargs))
        meta = {
            "model": {
                "name": getattr(model.fn, "__name__", "model"),
                "observed": list(model.observed),
                "targets": list(f.space.names),
                "fingerprint": fingerprint,
            },
            "signature": _signature(model, args, kwargs),
            "sites": encode_sites(model.describe(*args, **kwargs)),
        }
    args_meta, args_arrays = _encode_args(post.model_args, post.model_kwargs)
    if isinstance(model, DetachedModel) and not model.content["model_args"]["saved"]:
        args_meta = model.content["model_args"]
    arrays.update(args_arrays)
    summary = f.summary_net
    content = {
        "inference_net": network_config(post.inference_net),
        "summary_net": None if summary is None else network_config(summary),
        **meta,
        "model_args": args_meta,
        "space": encode_space(f.space),
        "layout": encode_layout(f.layout),
        "history": None if post.history is None else post.history.to_dict(),
        "trees": {"params": p_index, "rest": r_index},
    }
    return {"posterior": content}, arrays


def _encode_args(args: tuple, kwargs: dict) -> tuple[dict, dict[str, np.ndarray]]:
    """Model arguments: plain data in JSON, arrays as arrays, else unsaved."""
    arrays: dict[str, np.ndarray] = {}
    saved = True

    def one(name: str, v: Any) -> Any:
        nonlocal saved
        if isinstance(v, np.ndarray | jax.Array):
            arrays[name] = np.asarray(v)
            return {"__array__": name}
        if isinstance(v, tuple):
            return {"__tuple__": [one(f"{name}/{i}", x) for i, x in enumerate(v)]}
        try:
            json.dumps(v, allow_nan=False)
        except (TypeError, ValueError):
            saved = False
            return {"__unsaved__": repr(v)}
        return v

    meta = {
        "args": [one(f"model_args/{i}", a) for i, a in enumerate(args)],
        "kwargs": {k: one(f"model_kwargs/{k}", v) for k, v in kwargs.items()},
    }
    return {**meta, "saved": saved}, arrays if saved else {}


def _decode_args(meta: dict, arrays: dict) -> tuple[tuple, dict] | None:
    if not meta["saved"]:
        return None

    def one(v: Any) -> Any:
        if isinstance(v, dict) and "__array__" in v:
            return arrays[v["__array__"]]
        if isinstance(v, dict) and "__tuple__" in v:
            return tuple(one(x) for x in v["__tuple__"])
        return v

    return tuple(one(a) for a in meta["args"]), {
        k: one(v) for k, v in meta["kwargs"].items()
    }


# -------------------------------------------------------------------- decode
def fitted_from(
    path: Any,
    content: dict[str, Any],
    arrays: dict[str, np.ndarray],
    inference_net: Any,
    summary_net: Any,
) -> _Fitted:
    """Rebuild the networks from their specs and put the saved weights in."""
    from numpyro_amortized.posterior import _Fitted

    space = decode_space(content["space"])
    layout = decode_layout(content["layout"])
    net = build_amortizer(
        jax.random.key(0), inference_net, summary_net, space.dim, layout
    )
    graphdef, params, rest = nnx.split(net, nnx.Param, ...)
    trees = content["trees"]
    try:
        params = tree_from_arrays("params", params, trees["params"], arrays)
        rest = tree_from_arrays("rest", rest, trees["rest"], arrays)
    except TreeMismatchError as e:
        raise AmortizerFileError(
            f"{path}: {e} The network classes changed since the file was saved."
        ) from e

    def std(name: str) -> Standardizer:
        return Standardizer(
            jnp.asarray(arrays[f"{name}/mean"]), jnp.asarray(arrays[f"{name}/std"])
        )

    return _Fitted(
        graphdef,
        params,
        rest,
        space,
        layout,
        std("theta_std"),
        std("x_std"),
        summary_net,
    )


def decode_posterior(
    path: Any,
    content: dict[str, Any],
    arrays: dict[str, np.ndarray],
    model: AmortizedModel | None,
    model_args: tuple | None,
    model_kwargs: dict | None,
) -> AmortizedPosterior:
    """Body of :func:`numpyro_amortized.load`."""
    from numpyro_amortized.posterior import AmortizedPosterior

    inference_net = network_from_config(content["inference_net"])
    summary = content["summary_net"]
    summary_net = None if summary is None else network_from_config(summary)
    args, kwargs = _decode_args(content["model_args"], arrays) or (None, None)
    args = args if model_args is None else tuple(model_args)
    kwargs = kwargs if model_kwargs is None else dict(model_kwargs)
    targets = None
    if model is None:
        model = DetachedModel(path, content)
    else:
        if args is None or kwargs is None:
            raise ValueError(
                f"{path} was trained with model arguments that could not be saved "
                f"({content['model_args']}); pass model_args=... and "
                "model_kwargs=... to load it with its model."
            )
        check_model(path, content, model, args, kwargs)
        saved_targets = tuple(content["model"]["targets"])
        if model.target_names(*args, **kwargs) != saved_targets:
            targets = saved_targets
    post = AmortizedPosterior(
        model,
        inference_net,
        summary_net,
        targets,
        model_args=args or (),
        model_kwargs=kwargs or {},
    )
    post._fitted = fitted_from(path, content, arrays, inference_net, summary_net)
    history = content["history"]
    post.history = None if history is None else history_from_dict(history)
    return post


def history_from_dict(data: dict[str, Any]) -> History:
    """A :class:`~numpyro_amortized.History` from its saved dict (fields this
    version does not know are dropped)."""
    known = {f.name for f in dataclasses.fields(History)}
    return History(**{k: v for k, v in data.items() if k in known})
