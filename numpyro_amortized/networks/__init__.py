"""Flax (nnx) normalizing flows and summary networks.

What users pass are frozen, serializable *specs* (``NeuralSplineFlow(num_layers=6)``,
``DeepSet(summary_dim=16)``); ``spec.build(...)`` makes the nnx module once the
model's dimensions are known:

* flows: ``spec.build(num_params, context_dim, *, rngs)`` -> module with
  ``forward_and_log_det``, ``inverse_and_log_det``, ``log_prob``, ``sample``,
  ``sample_and_log_prob`` and ``loss`` (see :mod:`.base`);
* summaries: ``spec.build(input_dim, *, rngs)`` -> module called as
  ``module(x, mask=None) -> (..., summary_dim)`` (see :mod:`.summary`); a user's own
  nnx module with that call protocol works too.

``spec.to_config()`` / :func:`spec_from_config` round-trip specs through plain dicts;
a user's own nnx module becomes savable with :func:`register_module`.
"""

from .base import FlowModule, is_flow_module, standard_normal_log_prob
from .bayesian import (
    BayesianModule,
    BayesianNetwork,
    LogVariance,
    bayesian,
    is_bayesian,
    sample_weights,
)
from .bayesian_paths import format_path, parameter_paths
from .coupling import CouplingFlow, CouplingFlowModule
from .deep_set import DeepSet, DeepSetModule
from .flow_matching import FlowMatching, FlowMatchingModule
from .mlp import MLP, DenseNetwork, MLPSummary
from .registry import (
    MODULES,
    SPECS,
    network_config,
    network_from_config,
    register_module,
    register_spec,
    spec_from_config,
)
from .set_transformer import SetTransformer, SetTransformerModule
from .spline_flow import NeuralSplineFlow
from .summary import build_summary, is_summary_module, summary_output_dim
from .time_series import TimeSeriesModule, TimeSeriesNetwork

FLOW_SPECS: tuple[type, ...] = (NeuralSplineFlow, CouplingFlow, FlowMatching)
"""All flow spec classes (tests and benchmarks iterate over this)."""

SUMMARY_SPECS: tuple[type, ...] = (DeepSet, SetTransformer, TimeSeriesNetwork, MLP)
"""All summary spec classes."""

__all__ = [
    "FLOW_SPECS",
    "MLP",
    "MODULES",
    "SPECS",
    "SUMMARY_SPECS",
    "BayesianModule",
    "BayesianNetwork",
    "CouplingFlow",
    "CouplingFlowModule",
    "DeepSet",
    "DeepSetModule",
    "DenseNetwork",
    "FlowMatching",
    "FlowMatchingModule",
    "FlowModule",
    "LogVariance",
    "MLPSummary",
    "NeuralSplineFlow",
    "SetTransformer",
    "SetTransformerModule",
    "TimeSeriesModule",
    "TimeSeriesNetwork",
    "bayesian",
    "build_summary",
    "format_path",
    "is_bayesian",
    "is_flow_module",
    "is_summary_module",
    "network_config",
    "network_from_config",
    "parameter_paths",
    "register_module",
    "register_spec",
    "sample_weights",
    "spec_from_config",
    "standard_normal_log_prob",
    "summary_output_dim",
]
