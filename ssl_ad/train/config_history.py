"""Resuming with a changed config: what may change, what is refused, and the workdir's record of it.

On resume the new config is compared with the one the latest checkpoint was
saved with (its ``meta``; ``config.json`` for checkpoints without one), key by
dotted key:

* bookkeeping keys (:data:`BOOKKEEPING_KEYS`: logging and checkpoint cadence,
  retention, paths, threads, rematerialisation) may change; the change is logged;
* ``total_steps`` may grow (the run is made longer); this re-stretches the
  cosine schedules (learning rate, weight decay, DINO's teacher momentum) over
  the new length from the resume step on, which is logged;
* a key the old config lacks (it predates the key) is no change when the new
  value is what the code did before the key existed (:data:`LEGACY_VALUES`,
  else the key's default in ``ssl_ad/config_defaults.py``); logged once;
* any other change is refused (UserInputError naming every key, old -> new)
  unless ``allow`` names it (``train.py --allow_config_change=KEY,...`` or ``all``).

Every start of a resumed run that changed something appends one JSON line to
``workdir/config_history.jsonl`` (time, step, each change old/new, which were
bookkeeping and which were allowed by the flag); the first start writes one too.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from collections.abc import Iterable
from typing import Any

from ssl_ad import config_defaults
from ssl_ad.config_check import ABSENT, config_diff, flat_config
from ssl_ad.errors import UserInputError

log = logging.getLogger(__name__)

HISTORY_FILE = "config_history.jsonl"
ALLOW_ALL = "all"

# Keys that change how a run is logged, saved, located or computed, never what it computes.
BOOKKEEPING_KEYS = frozenset({
    "log_every", "checkpoint_every", "keep_checkpoints",
    "data.data_dir", "data.download", "data.threads", "data.mvtec_root", "data.coco_root",
    "model.remat",  # recompute activations in the backward pass: same numbers, less memory
    # A name for model.width/depth/num_heads/mlp_ratio/patch_size, which validation resolves it into
    # before this check and which are compared themselves (so a run saved before the key, or with
    # the sizes spelled out, resumes under a config that names them 'S/16').
    "model.variant",
    "inject_nan_at_step",  # a former testing aid (now tests/hooks.py): configs of older runs still hold it
    # The AD monitor only measures (on images the step never sees when training on '<split>:fit').
    "monitor.every_steps", "monitor.protocols", "monitor.max_bank", "monitor.pooling", "monitor.k",
    "monitor.metric", "monitor.pca_dims", "monitor.batch_size",
})
# What the code did before a key existed, where that differs from the key's default today: an old
# run (config without the key) resumed with this value is unchanged. Add an entry when a new key's
# default changes the behaviour of existing configs.
LEGACY_VALUES: dict[str, Any] = {
    "data.crop_sampler": "tf_bounding_box",
    "data.resize_antialias": False,
    "data.color_jitter_impl": "additive_brightness",
    "optim.clip_mode": "global",
    "optim.weight_decay_exclude": ["pos_embed", "cls_token", "cls_pos", "mask_token"],
    **{f"model.{k}": v for k, v in getattr(config_defaults, "LEGACY_MODEL_KEYS", {}).items()},
}


def default_values() -> dict[str, Any]:
    """Flat defaults of every training key (base config, MAE and DINO blocks, multi-crop data)."""
    base = config_defaults.base_config()
    out = flat_config(base)
    out.update(flat_config(config_defaults.mae_block(), "mae."))
    out.update(flat_config(config_defaults.dino_block(), "dino."))
    out.update(flat_config(config_defaults.multicrop_data(base.data), "data."))
    return out


def parse_allow(allow: str | Iterable[str] | None) -> set[str]:
    if not allow:
        return set()
    items = allow.split(",") if isinstance(allow, str) else list(allow)
    return {str(k).strip() for k in items if str(k).strip()}


def _show(value: Any) -> str:
    if value is ABSENT:
        return "(absent)"
    return json.dumps(value)


class ResumeCheck:
    """The comparison of a resumed run's config with its saved one (see the module docstring)."""

    def __init__(self, old: dict[str, Any], new: dict[str, Any], step: int, allow: set[str]):
        self.step = step
        self.allow = allow
        defaults = {**default_values(), **LEGACY_VALUES}
        self.changes: dict[str, tuple[Any, Any]] = {}
        self.new_keys: dict[str, Any] = {}  # absent before, at the value the old code used
        for key, (a, b) in config_diff(old, new).items():
            if a is ABSENT and key in defaults and defaults[key] == b:
                self.new_keys[key] = b
            else:
                self.changes[key] = (a, b)
        self.bookkeeping = sorted(k for k in self.changes if self._is_bookkeeping(k))
        rest = [k for k in self.changes if k not in self.bookkeeping]
        everything = ALLOW_ALL in allow
        self.overridden = sorted(k for k in rest if everything or k in allow)
        self.refused = sorted(k for k in rest if k not in self.overridden)

    def _is_bookkeeping(self, key: str) -> bool:
        if key in BOOKKEEPING_KEYS:
            return True
        if key == "total_steps":
            a, b = self.changes[key]
            return isinstance(a, int) and isinstance(b, int) and b > a
        return False

    def raise_if_refused(self, workdir: str) -> None:
        if not self.refused:
            return
        shown = "; ".join(f"{k}: {_show(self.changes[k][0])} -> {_show(self.changes[k][1])}" for k in self.refused)
        keys = ",".join(self.refused)
        raise UserInputError(
            f"{workdir} was trained to step {self.step} with a different config: {shown}. Resuming would mix two "
            f"settings in one run; use another --workdir, or pass --allow_config_change={keys} (or =all) to "
            f"resume anyway (recorded in {os.path.join(workdir, HISTORY_FILE)})"
        )

    def log(self) -> None:
        for key, value in self.new_keys.items():
            log.info("Config key %s is new since this run started; its value %s is what the run used before.",
                     key, json.dumps(value))
        for key in self.bookkeeping:
            a, b = self.changes[key]
            log.info("Resuming with %s changed: %s -> %s (bookkeeping).", key, _show(a), _show(b))
            if key == "total_steps":
                log.warning(
                    "total_steps grew from %s to %s: the cosine schedules (learning rate, weight decay, DINO "
                    "teacher momentum) are stretched over the new length from step %d on, so this run is not "
                    "the same as one trained for %s steps from the start.", a, b, self.step, b)
        for key in self.overridden:
            a, b = self.changes[key]
            log.warning("Resuming with %s changed: %s -> %s (allowed by --allow_config_change; recorded in %s).",
                        key, _show(a), _show(b), HISTORY_FILE)
        unused = sorted(self.allow - set(self.changes) - {ALLOW_ALL})
        if unused:
            log.info("--allow_config_change names keys that did not change: %s", ", ".join(unused))

    def record(self) -> dict[str, Any] | None:
        """The config_history.jsonl row of this resume (None when nothing changed)."""
        if not self.changes and not self.new_keys:
            return None
        return {
            "event": "resume",
            "step": self.step,
            "changes": {k: {"old": None if a is ABSENT else a, "new": None if b is ABSENT else b,
                            **({"absent_before": True} if a is ABSENT else {})}
                        for k, (a, b) in self.changes.items()},
            "bookkeeping": self.bookkeeping,
            "allowed_by_flag": self.overridden,
            "allow_config_change": ",".join(sorted(self.allow)),
            "new_keys_at_old_behaviour": self.new_keys,
        }


def check_resume(saved: dict[str, Any] | None, config: Any, step: int, allow: str | Iterable[str] | None,
                 workdir: str) -> ResumeCheck | None:
    """Compares ``config`` with the ``saved`` one (nested dict) of a run at ``step``; raises
    UserInputError on a change that is not allowed. None when there is no saved config."""
    if saved is None:
        log.warning("No saved config to compare with in %s; resuming at step %d without a check.", workdir, step)
        return None
    check = ResumeCheck(flat_config(saved), flat_config(config), step, parse_allow(allow))
    check.raise_if_refused(workdir)
    return check


def append_history(workdir: str, row: dict[str, Any]) -> None:
    row = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **row}
    with open(os.path.join(workdir, HISTORY_FILE), "a") as f:
        f.write(json.dumps(row, sort_keys=False) + "\n")
