"""Ablation plans: expanding a grid (or an explicit list) × seeds into runs, with names and checks.

An ablation config (see :func:`ablation_config`) names a base training config
file and a base evaluation config file, and what to vary:

* ``grid``: dotted config key -> list of values; the runs are the Cartesian
  product of the axes (in key order, last key varying fastest). A value may
  be anything the base key accepts: a tuple (``data.crop_scale``) stays one
  value; a dict is a group of overrides under that key (``"model": [{"depth":
  2, "width": 64}, ...]``). Nested dicts (``{"mae": {"mask_ratio": [...]}}``)
  are the same as dotted keys.
* ``settings``: an explicit list of override dicts instead of a grid (for
  settings that change several keys together); ``"_label"`` names one.

Keys prefixed with ``eval.`` go to the evaluation config (``eval.pooling``):
settings that differ only in them share one trained checkpoint. Every key
(grid, settings, ``train_overrides``, ``eval_overrides``) is checked against
the base configs when the plan is made, before anything is trained, and so is
every run's resolved value (:mod:`ssl_ad.config_check`: ranges and choices).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.util
import itertools
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from ssl_ad.config_check import validate_eval_config, validate_train_config
from ssl_ad.errors import UserInputError

EVAL_PREFIX = "eval."
LABEL_KEY = "_label"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Training keys that may differ between a run's first start and its resumption.
RESUMABLE_KEYS = ("checkpoint_every", "log_every", "keep_checkpoints", "data.data_dir", "data.download", "data.threads")


def dotted(mapping: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
    """A ConfigDict that accepts dotted keys: ``c.grid = dotted({"mae.mask_ratio": [0.5, 0.9]})``."""
    return ml_collections.ConfigDict(dict(mapping or {}), allow_dotted_keys=True)


def ablation_config() -> ml_collections.ConfigDict:
    """Defaults of every ablation config (``configs/ablations/*.py`` start from this)."""
    c = ml_collections.ConfigDict()
    c.name = ""  # title of ablation.md (default: the outdir's name)
    c.train_config = ""  # base training config file, e.g. configs/mae_mnist5k.py
    c.eval_config = ""  # base evaluation config file, e.g. configs/eval_mnist5k.py
    c.grid = dotted()  # dotted key -> list of values (Cartesian product); 'eval.' keys: evaluation only
    c.settings = []  # or: explicit list of override dicts (one per setting); not both
    c.seeds = 1  # number of seeds: runs with seed 0..seeds-1 (the training config's `seed`)
    c.train_overrides = dotted()  # fixed overrides of every training config (e.g. shorter runs)
    c.eval_overrides = dotted()  # fixed overrides of every evaluation config
    c.baselines = False  # also evaluate and tabulate the eval config's `sources` (pixels, random_init)
    c.data_dir = ""  # tfds data dir for training and evaluation ('' = the configs' own)
    return c


# ---------------------------------------------------------------------------------------------
# Settings


@dataclasses.dataclass(frozen=True)
class Setting:
    """One point of the sweep: its overrides (train keys plain, eval keys 'eval.'-prefixed)."""

    index: int
    overrides: dict[str, Any]
    axes: tuple[tuple[str, Any], ...]  # (grid key, value) of this point; () in list mode
    label: str  # "mask_ratio=0.9"
    slug: str  # "mask_ratio-0.9": folder-safe
    train_slug: str  # slug of the training overrides only ("base" if none): names the workdir
    eval_slug: str  # slug of the 'eval.' overrides only ("" if none)

    @property
    def train_overrides(self) -> dict[str, Any]:
        return {k: v for k, v in self.overrides.items() if not k.startswith(EVAL_PREFIX)}

    @property
    def eval_overrides(self) -> dict[str, Any]:
        return {k[len(EVAL_PREFIX):]: v for k, v in self.overrides.items() if k.startswith(EVAL_PREFIX)}


def _plain(value: Any) -> Any:
    """ConfigDicts -> dicts (recursively); everything else unchanged."""
    if isinstance(value, ml_collections.ConfigDict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"mae": {"mask_ratio": x}, "model.depth": y}`` -> ``{"mae.mask_ratio": x, "model.depth": y}``."""
    out: dict[str, Any] = {}
    for key, value in _plain(mapping).items():
        if not isinstance(key, str) or not key:
            raise UserInputError(f"override keys must be non-empty strings, got {key!r}")
        full = f"{prefix}{key}"
        if isinstance(value, Mapping) and key != LABEL_KEY:
            if not value:
                raise UserInputError(f"'{full}' is an empty group of overrides")
            out.update(flatten(value, full + "."))
        else:
            out[full] = value
    return out


def _grid_axes(grid: Mapping[str, Any]) -> list[tuple[str, list[Any]]]:
    axes = []
    for key, values in flatten(grid).items():
        if isinstance(values, str) or not isinstance(values, Sequence):
            raise UserInputError(f"grid key '{key}' must map to a list of values, got {values!r}")
        if not values:
            raise UserInputError(f"grid key '{key}' has no values")
        axes.append((key, list(values)))
    return axes


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(format_value(v) for v in value) + ")"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}={format_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def slug_text(text: str) -> str:
    text = text.replace("(", "").replace(")", "").replace("{", "").replace("}", "").replace(", ", ",")
    text = re.sub(r"[^A-Za-z0-9_.,+=-]+", "-", text)
    return text.strip("-.") or "x"


def short_names(keys: Sequence[str]) -> dict[str, str]:
    """Each dotted key's last part, or the whole key where two keys share a last part."""
    def tail(k: str) -> str:
        return k.split(".")[-1]

    counts: dict[str, int] = {}
    for k in dict.fromkeys(keys):
        counts[tail(k)] = counts.get(tail(k), 0) + 1
    return {k: tail(k) if counts[tail(k)] == 1 else k for k in keys}


def _describe(overrides: Mapping[str, Any], names: Mapping[str, str]) -> tuple[str, str]:
    """(label, slug) of a set of overrides."""
    if not overrides:
        return "base", "base"
    label = ", ".join(f"{names[k]}={format_value(v)}" for k, v in overrides.items())
    slug = "__".join(f"{slug_text(names[k])}-{slug_text(format_value(v))}" for k, v in overrides.items())
    if len(slug) > 100:
        slug = slug[:80].rstrip("-_.") + "-" + hashlib.sha1(label.encode()).hexdigest()[:8]
    return label, slug


def _unique(slugs: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for s in slugs:
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.append(s if n == 0 else f"{s}-{n + 1}")
    return out


def expand(ablation: Any) -> list[Setting]:
    """The settings of an ablation config: its grid's Cartesian product or its explicit list.

    Neither given: one setting, the base configs ("base"). A seed is not a
    setting (see :func:`seeds_of`); ``checkpoint`` of the evaluation is set
    by the sweep.
    """
    grid = _plain(ablation.get("grid") or {})
    listed = list(ablation.get("settings") or [])
    if grid and listed:
        raise UserInputError("give either `grid` or `settings` (an explicit list), not both")
    points: list[tuple[dict[str, Any], tuple[tuple[str, Any], ...], str | None]] = []
    if listed:
        for i, item in enumerate(listed):
            if not isinstance(item, Mapping):
                raise UserInputError(f"settings[{i}] must be a dict of overrides, got {item!r}")
            item = _plain(item)
            name = item.pop(LABEL_KEY, None)
            points.append((flatten(item), (), None if name is None else str(name)))
    elif grid:
        axes = _grid_axes(grid)
        for combo in itertools.product(*[values for _, values in axes]):
            overrides: dict[str, Any] = {}
            for (key, _), value in zip(axes, combo):
                overrides.update(flatten({key: value}) if isinstance(value, Mapping) else {key: value})
            points.append((overrides, tuple((k, v) for (k, _), v in zip(axes, combo)), None))
    else:
        points.append(({}, (), None))

    for overrides, _, _ in points:
        for key in overrides:
            if key == "seed":
                raise UserInputError("`seed` cannot be swept in the grid or settings: use `seeds`")
            if key == EVAL_PREFIX + "checkpoint":
                raise UserInputError("`eval.checkpoint` is set by the sweep (each run's workdir)")
    seen: dict[str, int] = {}
    for i, (overrides, _, _) in enumerate(points):
        canon = json.dumps(overrides, sort_keys=True, default=repr)
        if canon in seen:
            raise UserInputError(f"settings {seen[canon]} and {i} are identical: {overrides}")
        seen[canon] = i

    names = short_names([k for overrides, _, _ in points for k in overrides])
    labels, slugs, train_slugs, eval_slugs = [], [], [], []
    train_keys: dict[str, list[str]] = {}  # train slug -> distinct training overrides that produced it
    for overrides, _, name in points:
        train = {k: v for k, v in overrides.items() if not k.startswith(EVAL_PREFIX)}
        evals = {k: v for k, v in overrides.items() if k.startswith(EVAL_PREFIX)}
        label, slug = _describe(overrides, names)
        if name is not None:
            label, slug = name, slug_text(name)
        labels.append(label)
        slugs.append(slug)
        # Equal training overrides share a workdir (eval-only axes reuse the checkpoint); different ones never do.
        tslug = slug if name is not None and not evals else _describe(train, names)[1]
        variants = train_keys.setdefault(tslug, [])
        canon = json.dumps(train, sort_keys=True, default=repr)
        if canon not in variants:
            variants.append(canon)
        n = variants.index(canon)
        train_slugs.append(tslug if n == 0 else f"{tslug}-{n + 1}")
        eval_slugs.append(_describe(evals, names)[1] if evals else "")
    return [
        Setting(i, o, a, label, slug, tslug, eslug)
        for i, ((o, a, _), label, slug, tslug, eslug) in enumerate(
            zip(points, labels, _unique(slugs), train_slugs, eval_slugs)
        )
    ]


def seeds_of(ablation: Any) -> list[int]:
    """Seeds 0..seeds-1 (raising ``seeds`` later adds runs; the finished ones are skipped)."""
    seeds = ablation.get("seeds", 1)
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise UserInputError(f"`seeds` must be a count of at least 1, got {seeds!r}")
    return list(range(seeds))


# ---------------------------------------------------------------------------------------------
# Base configs and overrides


def resolve_path(path: str) -> str:
    """A config path as given (relative to the working directory), else relative to the repository."""
    if not path:
        raise UserInputError("the ablation config must name `train_config` and `eval_config` files")
    for candidate in (path, os.path.join(REPO_ROOT, path)):
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    raise UserInputError(f"config file {path} not found (neither in {os.getcwd()} nor in {REPO_ROOT})")


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """``get_config()`` of a Python config file, like ``--config=path`` does."""
    full = resolve_path(path)
    name = "_ablation_base_" + re.sub(r"\W", "_", os.path.relpath(full, REPO_ROOT))
    spec = importlib.util.spec_from_file_location(name, full)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as e:
        raise UserInputError(f"config file {path} cannot be loaded: {e}") from e
    if not hasattr(module, "get_config"):
        raise UserInputError(f"config file {path} has no get_config()")
    config = module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise UserInputError(f"get_config() of {path} did not return a ConfigDict")
    return config


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: Mapping[str, Any], origin: str, shown_prefix: str = ""
) -> ml_collections.ConfigDict:
    """A copy of ``config`` with dotted-key ``overrides``; a key ``config`` lacks is a UserInputError.

    Messages name keys as the user wrote them (``shown_prefix`` + key, e.g. 'eval.pooling').

    Lists become tuples where the base value is a tuple; a bool is never
    accepted for a number (nor a number for a bool); other type mismatches
    are ConfigDict's own checks.
    """
    config = config.copy_and_resolve_references()
    for bare, value in flatten(overrides).items():
        node = config
        parts = bare.split(".")
        key = shown_prefix + bare
        for depth, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                where = ".".join(parts[:depth])
                options = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                close = difflib.get_close_matches(part, options, n=1)
                hint = f" (did you mean '{shown_prefix}{'.'.join(parts[:depth] + close[:1])}'?)" if close else ""
                inside = f" under '{where}'" if where else ""
                raise UserInputError(f"unknown key '{key}' in {origin}: no '{part}'{inside}{hint}")
            if depth < len(parts) - 1:
                node = node[part]
        leaf, old = parts[-1], node[parts[-1]]
        if isinstance(old, ml_collections.ConfigDict):
            raise UserInputError(f"'{key}' in {origin} is a group of keys ({', '.join(old.keys())}); override its keys")
        if isinstance(old, tuple) and isinstance(value, list):
            value = tuple(value)
        if old is not None and isinstance(old, bool) != isinstance(value, bool):
            raise UserInputError(f"'{key}' in {origin}: {value!r} does not match the base value's type ({old!r})")
        try:
            node[leaf] = value
        except (TypeError, ValueError) as e:
            raise UserInputError(f"'{key}' in {origin}: cannot set it to {value!r} ({e})") from e
    return config


def normalised(config: Any) -> Any:
    """JSON-comparable form of a config (tuples -> lists), as config.json / results.json store it."""
    data = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
    return json.loads(json.dumps(data, sort_keys=True, default=repr))


def config_differences(a: Any, b: Any, ignore: Sequence[str] = (), prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two normalised configs."""
    out = []
    for key in sorted(set(a) | set(b)):
        full = prefix + key
        if full in ignore:
            continue
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out.extend(config_differences(x, y, ignore, full + "."))
        elif x != y:
            out.append(full)
    return out


# ---------------------------------------------------------------------------------------------
# The plan


@dataclasses.dataclass
class Run:
    """One setting × seed: where it trains and evaluates, and its resolved configs."""

    number: int  # 1-based position in the sweep
    setting: Setting
    seed: int
    workdir: str
    evaldir: str
    train_config: ml_collections.ConfigDict
    eval_config: ml_collections.ConfigDict

    @property
    def title(self) -> str:
        return f"{self.setting.label} seed={self.seed}"


@dataclasses.dataclass
class Plan:
    name: str
    outdir: str
    train_config_path: str
    eval_config_path: str
    settings: list[Setting]
    seeds: list[int]
    runs: list[Run]
    baselines: bool
    axis_keys: list[str]  # the grid's keys (in order); [] in list mode


def make_plan(ablation: Any, outdir: str) -> Plan:
    """Expands and validates the whole sweep; raises UserInputError before anything is written.

    Runs are ordered seed-major (every setting at the first seed, then the next
    seed), so a sweep cut short still compares every setting.
    """
    settings = expand(ablation)
    seeds = seeds_of(ablation)
    train_path, eval_path = str(ablation.get("train_config", "")), str(ablation.get("eval_config", ""))
    base_train = load_config_file(train_path)
    base_eval = load_config_file(eval_path)

    fixed_train = flatten(ablation.get("train_overrides") or {})
    fixed_eval = flatten(ablation.get("eval_overrides") or {})
    if "seed" in fixed_train:
        raise UserInputError("`seed` cannot be a fixed training override: use `seeds`")
    if "checkpoint" in fixed_eval:
        raise UserInputError("`checkpoint` of the evaluation is set by the sweep (each run's workdir)")
    data_dir = str(ablation.get("data_dir", "") or "")
    if data_dir:
        fixed_train.setdefault("data.data_dir", data_dir)
        fixed_eval.setdefault("data.data_dir", data_dir)
    if not ablation.get("baselines", False):
        fixed_eval.setdefault("sources", "")

    base_train = apply_overrides(base_train, fixed_train, f"train_overrides (base {train_path})")
    base_eval = apply_overrides(base_eval, fixed_eval, f"eval_overrides (base {eval_path})")
    kind = "settings" if ablation.get("settings") else "grid"

    runs: list[Run] = []
    for seed in seeds:
        for s in settings:
            train_cfg = apply_overrides(base_train, s.train_overrides, f"{kind} (base training config {train_path})")
            train_cfg.seed = seed
            eval_cfg = apply_overrides(base_eval, s.eval_overrides, f"{kind} (base evaluation config {eval_path})",
                                       shown_prefix=EVAL_PREFIX)
            workdir = os.path.join(outdir, "runs", s.train_slug, f"seed{seed}")
            evaldir = os.path.join(workdir, "eval" if not s.eval_slug else f"eval-{s.eval_slug}")
            eval_cfg.checkpoint = workdir
            for validate, cfg in ((validate_train_config, train_cfg), (validate_eval_config, eval_cfg)):
                try:
                    validate(cfg)
                except UserInputError as e:
                    raise UserInputError(f"{kind} setting '{s.label}': {e}") from e
            runs.append(Run(len(runs) + 1, s, seed, workdir, evaldir, train_cfg, eval_cfg))

    axis_keys = [k for k, _ in settings[0].axes] if settings and settings[0].axes else []
    name = str(ablation.get("name", "") or os.path.basename(os.path.normpath(outdir)))
    return Plan(name, outdir, train_path, eval_path, settings, seeds, runs, bool(ablation.get("baselines", False)), axis_keys)


# Marker file in a run's workdir: the run diverged; the sweep skips it until the file is deleted.
DIVERGED = "DIVERGED.txt"


def format_seconds(seconds: float) -> str:
    """Seconds as '1h02m03s', '2m03s' or '3s' (rounded to whole seconds; negative counts as 0)."""
    s = int(round(max(seconds, 0.0)))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m{s:02d}s"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"
