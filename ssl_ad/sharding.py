"""Data-parallel placement over every device of every host, and the processes of a multi-host run.

One 1-D mesh axis 'data': batches are split along their first dimension,
parameters and optimiser state are replicated. The same jitted step then runs
on 1 CPU, 8 GPUs or several hosts.

Several hosts run one process each (or one per GPU under SLURM), joined by
``jax.distributed`` (:func:`maybe_initialize_distributed`). Every process runs
the same steps; process 0 alone writes the run's files (:func:`is_main_process`);
orbax coordinates the checkpoint writes of all of them.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ssl_ad.errors import UserInputError

log = logging.getLogger(__name__)

# Variables that name a cluster without saying how many processes it has: initialise and let JAX find out.
_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES")
# The variables JAX's SLURM detection needs (set inside an `srun` job step): SLURM_NTASKS is the process count.
_SLURM_STEP_ENV = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def _env_int(name: str) -> int | None:
    """The integer value of environment variable ``name``; None when unset or empty.

    Raises:
      UserInputError: when it is set to something that is not an integer.
    """
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise UserInputError(f"environment variable {name}={value!r} is not an integer") from None


def launched_process_count() -> int | None:
    """How many processes the environment says were started together for this job.

    JAX_NUM_PROCESSES (a hand-started cluster), else, where JAX's SLURM detection applies (an
    ``srun`` job step), the step's task count SLURM_STEP_NUM_TASKS (else SLURM_NTASKS: what JAX
    uses), else OMPI_COMM_WORLD_SIZE (``mpirun``); None when the environment names none of them.

    Raises:
      UserInputError: when one of them is set but not an integer.
    """
    count = _env_int("JAX_NUM_PROCESSES")
    if count is None and all(os.environ.get(k) for k in _SLURM_STEP_ENV):
        count = _env_int("SLURM_STEP_NUM_TASKS") or _env_int("SLURM_NTASKS")
    if count is None:
        count = _env_int("OMPI_COMM_WORLD_SIZE")
    return count


def _use_gloo_for_cpu_collectives() -> None:
    """Cross-process collectives between CPU devices need gloo; JAX versions before it was the
    default had none. A no-op where gloo (or MPI) is already chosen or the option does not exist."""
    try:
        current = jax.config.jax_cpu_collectives_implementation
    except AttributeError:
        return
    if current in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def maybe_initialize_distributed() -> None:
    """Calls ``jax.distributed.initialize()`` when the environment names a cluster of several processes.

    JAX reads JAX_COORDINATOR_ADDRESS itself and auto-detects SLURM (inside ``srun``), Open MPI and
    TPU pods; JAX_NUM_PROCESSES and JAX_PROCESS_ID (ours) supply the rest for a hand-started
    cluster. An environment that says there is one process (a single-task SLURM job,
    JAX_NUM_PROCESSES=1) is not initialised, so that process keeps every local device.
    Must run before anything touches a device, so it checks only the environment.

    Raises:
      UserInputError: when JAX_NUM_PROCESSES, JAX_PROCESS_ID, SLURM_NTASKS or OMPI_COMM_WORLD_SIZE
        is not an integer.
    """
    if jax.distributed.is_initialized():
        return
    count = launched_process_count()
    if count is None and not any(os.environ.get(k) for k in _CLUSTER_ENV):
        return
    if count == 1:
        return
    kwargs = {}
    if _env_int("JAX_NUM_PROCESSES") is not None:
        kwargs["num_processes"] = _env_int("JAX_NUM_PROCESSES")
    if _env_int("JAX_PROCESS_ID") is not None:
        kwargs["process_id"] = _env_int("JAX_PROCESS_ID")
    _use_gloo_for_cpu_collectives()
    jax.distributed.initialize(**kwargs)
    log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


def is_main_process() -> bool:
    """Whether this process writes the run's files (logs, configs, figures, reports): process 0."""
    return jax.process_index() == 0


def require_one_process(program: str) -> None:
    """Refuses to run ``program`` as one of several processes (it would write its outputs from each).

    Raises:
      UserInputError: when ``jax.distributed`` joined this process to others, or the environment
        says several were started (JAX_NUM_PROCESSES, SLURM_NTASKS in ``srun``, OMPI_COMM_WORLD_SIZE).
    """
    count = max(jax.process_count(), launched_process_count() or 1)
    if count > 1:
        raise UserInputError(
            f"{program} runs on one host, but this is one of {count} processes; run it as a single process "
            "(without JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES, or with srun --ntasks=1): it uses every "
            "device of that host"
        )


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
