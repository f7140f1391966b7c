"""Data-parallel training over several devices with ``jax.sharding``.

We use JAX's own machinery and build nothing of our own: a 1-D
:class:`jax.sharding.Mesh` over the devices (axis ``"batch"``), every training
batch laid out with ``NamedSharding(mesh, P("batch"))`` (each device holds
``batch_size / num_devices`` examples) and the parameters and optimizer state with
``NamedSharding(mesh, P())`` (a copy on every device). Inside the jitted epoch
``jax.lax.with_sharding_constraint`` pins these layouts; XLA's SPMD partitioner
then runs the per-example work (simulation, summary network, flow) on each
device's shard and inserts one all-reduce for the gradient. The update is the
same arithmetic as on one device: results agree up to the order of the
floating-point sums.

With ``jax.distributed.initialize(...)`` called first, ``jax.devices()`` lists the
devices of every process and the same code trains across hosts: each process
computes (and, in ``fit_online``, simulates) the examples of its own devices,
and only gradients cross the network.

Examples:
    >>> import jax
    >>> from numpyro_amortized.sharding import data_parallel
    >>> parallel = data_parallel(jax.devices())   # None with a single device
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["BATCH_AXIS", "DataParallel", "data_parallel", "gather_to_host_device"]

BATCH_AXIS = "batch"


class DataParallel(NamedTuple):
    """A 1-D device mesh and the two layouts data-parallel training uses.

    Attributes:
        mesh: ``Mesh(devices, ("batch",))``.
    """

    mesh: Mesh

    @property
    def num_devices(self) -> int:
        """Devices in the mesh (across all processes)."""
        return int(self.mesh.devices.size)

    @property
    def batch_sharding(self) -> NamedSharding:
        """Leading (example) axis split over the devices."""
        return NamedSharding(self.mesh, P(BATCH_AXIS))

    @property
    def replicated(self) -> NamedSharding:
        """A full copy on every device."""
        return NamedSharding(self.mesh, P())

    def shard(self, tree: Any) -> Any:
        """Inside ``jit``: lay out every leaf's leading axis over the devices."""
        return jax.tree.map(
            lambda a: jax.lax.with_sharding_constraint(a, self.batch_sharding), tree
        )

    def keep_replicated(self, tree: Any) -> Any:
        """Inside ``jit``: keep every leaf replicated (parameters, optimizer state)."""
        return jax.tree.map(
            lambda a: jax.lax.with_sharding_constraint(a, self.replicated), tree
        )

    def replicate(self, tree: Any) -> Any:
        """Outside ``jit``: put a copy of every leaf on every device.

        A no-op for leaves that are already laid out so. In a multi-process run
        every process must pass the same values (same keys, same bank).
        """
        return jax.device_put(tree, self.replicated)

    def check_batch_size(self, batch_size: int, where: str) -> None:
        """Raise unless ``batch_size`` splits evenly over the devices."""
        if batch_size % self.num_devices:
            raise ValueError(
                f"{where}: batch_size={batch_size} does not split evenly over the "
                f"{self.num_devices} devices of the data-parallel mesh. Use a "
                f"multiple of {self.num_devices}, or pass devices=[...] with fewer "
                "devices (devices=jax.devices()[:1] trains on one)."
            )


def data_parallel(devices: Sequence[Any] | None = None) -> DataParallel | None:
    """The data-parallel layout for ``devices``, or None for a single device.

    Args:
        devices: the devices to train on; default every device JAX sees
            (``jax.devices()``, all processes included after
            ``jax.distributed.initialize``).

    Returns:
        A :class:`DataParallel`, or None when there is one device (training then
        runs exactly as without sharding).

    Raises:
        ValueError: an empty list or repeated devices.

    Examples:
        >>> import jax
        >>> from numpyro_amortized.sharding import data_parallel
        >>> p = data_parallel(jax.devices()[:1])
        >>> p is None
        True
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("devices=[] names no device; pass None for all devices.")
    if len({d.id for d in devices}) != len(devices):
        raise ValueError(f"devices= lists a device twice: {devices}.")
    if len(devices) == 1:
        return None
    return DataParallel(Mesh(np.array(devices), (BATCH_AXIS,)))


def gather_to_host_device(tree: Any) -> Any:
    """Replicated (possibly multi-process) arrays -> arrays on this process's
    default device, so that later calls (``sample``, ``log_prob``) can mix them
    with ordinary host data."""
    return jax.tree.map(lambda a: jnp.asarray(np.asarray(a)), tree)
