"""Orbax checkpoints of the whole train state, with a readable error when they don't fit the config.

orbax writes each step into a temporary folder (``<step>.orbax-checkpoint-tmp``)
and renames it when complete, so a save killed half-way is never listed as a
step. orbax (>= 0.12.8) also writes ``commit_success.txt`` into every step
before it is finalised, but on a local disk it does not check for it: a step
folder without that marker (an interrupted copy or sync of a run) would be
taken as complete. :class:`Checkpointer` does check: such a folder is never a
step; a writable Checkpointer moves it aside to ``<step>.incomplete`` (kept,
not deleted) so the step can be saved again. ``latest_step`` is therefore the
latest complete checkpoint.

With several processes (``jax.distributed``) every process makes a Checkpointer on
the same (shared) directory: process 0 alone sets torn steps aside, then all wait
for each other before orbax lists the steps, so they agree on the latest one;
orbax coordinates the saves (each process writes its shards, process 0 finalises).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from ssl_ad.errors import UserInputError

log = logging.getLogger(__name__)

COMMIT_FILE = "commit_success.txt"  # orbax's marker of a finalised step


def uncommitted_step_dirs(directory: str) -> list[str]:
    """Step folders (``<digits>``) of ``directory`` that lack orbax's commit marker."""
    if not os.path.isdir(directory):
        return []
    return sorted(
        e.path for e in os.scandir(directory)
        if e.name.isdigit() and e.is_dir() and not os.path.exists(os.path.join(e.path, COMMIT_FILE))
    )


def _set_aside(path: str) -> str:
    target = f"{path}.incomplete"
    if os.path.exists(target):
        target = f"{path}.incomplete-{time.time_ns()}"
    os.replace(path, target)
    log.warning("Checkpoint %s is incomplete (no %s); moved it to %s and ignore it.", path, COMMIT_FILE, target)
    return target


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _shapes(tree: Any) -> dict[str, tuple]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_path_str(p): tuple(getattr(v, "shape", ())) for p, v in leaves}


def describe_mismatch(expected: Any, found: Any) -> str | None:
    """Names the first parameters whose presence or shape differs, or None when they match."""
    want, have = _shapes(expected), _shapes(found)
    problems = []
    for k in sorted(set(want) | set(have)):
        if k not in have:
            problems.append(f"{k}: expected {want[k]}, missing from the checkpoint")
        elif k not in want:
            problems.append(f"{k}: in the checkpoint {have[k]}, not in the model of this config")
        elif want[k] != have[k]:
            problems.append(f"{k}: config gives shape {want[k]}, checkpoint has {have[k]}")
    if not problems:
        return None
    more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
    return "; ".join(problems[:5]) + more


class Checkpointer:
    """Saves {state, meta} every call and restores the latest complete step."""

    def __init__(self, directory: str, max_to_keep: int = 3, read_only: bool = False):
        self.directory = os.path.abspath(directory)
        if read_only and not os.path.isdir(self.directory):
            raise UserInputError(f"no checkpoint directory at {self.directory}")
        self._ignored: set[int] = set()
        for path in uncommitted_step_dirs(self.directory):
            if read_only:
                log.warning("Ignoring incomplete checkpoint %s (no %s).", path, COMMIT_FILE)
                self._ignored.add(int(os.path.basename(path)))
            elif jax.process_index() == 0:  # the others see the folder moved once they pass the barrier
                _set_aside(path)
        if not read_only and jax.process_count() > 1:
            multihost_utils.sync_global_devices("ssl_ad.checkpointing: torn steps set aside")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,  # orbax's own leftovers of a killed save
        )
        # Handlers named up front so that item_metadata() can describe a step before restoring it.
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def all_steps(self) -> list[int]:
        """The complete checkpoints' steps, ascending."""
        return sorted(s for s in self.manager.all_steps() if s not in self._ignored)

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def meta(self, step: int) -> dict[str, Any]:
        return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

    def restore(self, step: int, target: Any) -> Any:
        """Restores ``step`` into the structure, shapes and shardings of ``target`` (a state)."""
        try:
            found = self.manager.item_metadata(step)["state"]
        except (OSError, ValueError, KeyError, TypeError) as e:  # unreadable metadata: restore() will tell
            log.warning("Cannot read the metadata of checkpoint %s/%s: %s", self.directory, step, e)
            found = None
        found_tree = getattr(found, "tree", found)
        if isinstance(found_tree, dict) and "params" in found_tree and hasattr(target, "params"):
            problem = describe_mismatch(target.params, found_tree["params"])
            if problem:
                if "/block0/" in problem or "/blocks/" in problem:  # ssl_ad.models.layouts' two layouts
                    problem += (". A ViT's blocks are stacked under 'blocks' in a run saved with "
                                "model.scan_blocks=True and one block{i} each without: keep the run's value")
                raise UserInputError(
                    f"checkpoint {self.directory}/{step} does not match the config's model: {problem}"
                )
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserInputError(f"checkpoint {self.directory}/{step} does not match the config: {e}") from e
        return out["state"]

    def restore_as_saved(self, step: int) -> dict[str, Any]:
        """The state of ``step`` as saved (a dict of jax arrays, no target structure): what evaluation
        reads from a run whose model it rebuilds from the saved config.

        Every array lands on this process's first device, whatever devices and processes saved it
        (orbax would otherwise insist on the saving topology: a run trained on 8 GPUs or several
        hosts is evaluated on one). A checkpoint without readable array metadata is restored as saved.
        """
        abstract = self._single_device_target(step)
        restore = ocp.args.StandardRestore(abstract) if abstract is not None else ocp.args.StandardRestore()
        return self.manager.restore(step, args=ocp.args.Composite(state=restore))["state"]

    def _single_device_target(self, step: int) -> Any | None:
        """Shapes and dtypes of ``step``'s arrays placed on the first local device; None if unknown."""
        try:
            found = self.manager.item_metadata(step)["state"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("Cannot read the metadata of checkpoint %s/%s: %s", self.directory, step, e)
            return None
        tree = getattr(found, "tree", found)
        leaves = jax.tree_util.tree_leaves(tree)
        if tree is None or not all(hasattr(x, "shape") and hasattr(x, "dtype") for x in leaves):
            return None
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(tuple(x.shape), x.dtype, sharding=device), tree)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
