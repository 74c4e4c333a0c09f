"""Data-parallel placement over every device of every host.

One 1-D mesh axis 'data': batches are split along their first dimension,
parameters and optimiser state are replicated. The same jitted step then runs
on 1 CPU, 8 GPUs or several hosts.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")


def maybe_initialize_distributed() -> None:
    """Calls ``jax.distributed.initialize()`` when the environment names a cluster (multi-host runs).

    JAX reads JAX_COORDINATOR_ADDRESS itself and auto-detects SLURM, Open MPI and TPU pods;
    JAX_NUM_PROCESSES and JAX_PROCESS_ID (ours) supply the rest for a hand-started cluster.
    Must run before anything touches a device, so it checks only the environment.
    """
    if not any(os.environ.get(k) for k in _CLUSTER_ENV) or jax.distributed.is_initialized():
        return
    kwargs = {}
    if os.environ.get("JAX_NUM_PROCESSES"):
        kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
    if os.environ.get("JAX_PROCESS_ID"):
        kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kwargs)
    log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


def data_mesh() -> Mesh:
    return Mesh(np.asarray(jax.devices()), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def replicate(tree: Any, mesh: Mesh) -> Any:
    return jax.device_put(tree, replicated(mesh))


def shard_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This host's slice of a batch -> global arrays split over the 'data' axis."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
