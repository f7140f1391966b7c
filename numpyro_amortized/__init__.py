"""numpyro_amortized: amortized Bayesian inference for NumPyro models.

Decorate a NumPyro model with :func:`amortize` to declare its observed sites; the
result is still a plain NumPyro model that also simulates training data fast and
describes its latent space.
"""

from numpyro_amortized import diagnostics, encoders, networks
from numpyro_amortized._version import __version__
from numpyro_amortized.bank import BankMismatchError, load_simulations, save_simulations
from numpyro_amortized.bayesian_guide import BayesianAmortizedGuide
from numpyro_amortized.bayesian_sites import bayesian_nnx_module, random_bayesian_module
from numpyro_amortized.blackbox import NumpySimulator
from numpyro_amortized.compare import NutsComparison, compare_with_nuts
from numpyro_amortized.disk_bank import DiskBank, simulate_to_disk
from numpyro_amortized.encoders import EncoderGuide
from numpyro_amortized.epistemic import EpistemicSummary
from numpyro_amortized.flow_distribution import FlowDistribution
from numpyro_amortized.guides import AmortizedGuide
from numpyro_amortized.history import History
from numpyro_amortized.io import load
from numpyro_amortized.model import AmortizedModel, amortize
from numpyro_amortized.posterior import AmortizedPosterior, NotFittedError
from numpyro_amortized.simulate import (
    InvalidSimulationWarning,
    SimulationError,
    SimulationInfo,
)
from numpyro_amortized.sites import ModelTraceError, PlateInfo, SiteInfo
from numpyro_amortized.space import LatentSpace

__all__ = [
    "AmortizedGuide",
    "AmortizedModel",
    "AmortizedPosterior",
    "BankMismatchError",
    "BayesianAmortizedGuide",
    "DiskBank",
    "EncoderGuide",
    "EpistemicSummary",
    "FlowDistribution",
    "History",
    "InvalidSimulationWarning",
    "LatentSpace",
    "ModelTraceError",
    "NotFittedError",
    "NumpySimulator",
    "NutsComparison",
    "PlateInfo",
    "SimulationError",
    "SimulationInfo",
    "SiteInfo",
    "__version__",
    "amortize",
    "bayesian_nnx_module",
    "compare_with_nuts",
    "diagnostics",
    "encoders",
    "load",
    "load_simulations",
    "networks",
    "random_bayesian_module",
    "save_simulations",
    "simulate_to_disk",
]
