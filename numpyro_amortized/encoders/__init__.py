"""VAE / AEVB encoder guides for models with per-datapoint latents.

:class:`EncoderGuide` is a NumPyro guide ``q(z_i | x_i)`` for the latent sites
inside a model's data plate, with an AutoGuide part for global latents. What it
uses per site is an *encoder spec* (frozen, serializable, like the specs in
:mod:`numpyro_amortized.networks`) built into a plain ``nnx.Module``:

* loc-scale families: :class:`NormalEncoder`, :class:`LaplaceEncoder`,
  :class:`StudentTEncoder`;
* a conditional normalizing flow: :class:`FlowEncoder`;
* discrete heads (train with ``TraceGraph_ELBO``): :class:`CategoricalEncoder`,
  :class:`BernoulliEncoder`.
"""

from .families import (
    BernoulliEncoder,
    CategoricalEncoder,
    DiscreteHeadModule,
    LaplaceEncoder,
    LocScaleModule,
    NormalEncoder,
    StudentTEncoder,
    default_encoder,
    unconstrained_shape,
)
from .flow import ConditionalFlowDistribution, FlowEncoder, FlowEncoderModule
from .guide import EncoderGuide, EncoderNetwork
from .structure import (
    LocalSite,
    LocalStructure,
    encoder_features,
    find_local_structure,
)

ENCODER_SPECS: tuple[type, ...] = (
    NormalEncoder,
    LaplaceEncoder,
    StudentTEncoder,
    FlowEncoder,
    CategoricalEncoder,
    BernoulliEncoder,
)
"""All encoder spec classes."""

__all__ = [
    "ENCODER_SPECS",
    "BernoulliEncoder",
    "CategoricalEncoder",
    "ConditionalFlowDistribution",
    "DiscreteHeadModule",
    "EncoderGuide",
    "EncoderNetwork",
    "FlowEncoder",
    "FlowEncoderModule",
    "LaplaceEncoder",
    "LocScaleModule",
    "LocalSite",
    "LocalStructure",
    "NormalEncoder",
    "StudentTEncoder",
    "default_encoder",
    "encoder_features",
    "find_local_structure",
    "unconstrained_shape",
]
