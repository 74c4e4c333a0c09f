"""Allowed values of every config key, checked before any data is loaded or anything is written.

One declarative table, :data:`RULES`: dotted key -> rule. A rule is an interval
(``Number("(0, 1)")``: open/closed bounds, ``inf`` for none; ``Int`` for
integers), a set of choices, a string pattern (``Pattern``), or a tuple whose
entries each have a rule (``Pair`` adds ``lo <= hi``). :data:`TRAIN_LINKS` /
:data:`EVAL_LINKS` hold the rules between keys (``image_size % patch_size == 0``, ...).
The links see the sizes ``model.variant`` (e.g. 'S/16') stands for, and a valid config
gets them written into its model block (:func:`resolve_model_variant`).

A key that a config lacks is skipped (configs written before the key existed);
a key that is not in the table is not checked. :func:`validate_train_config`
and :func:`validate_eval_config` raise one :class:`~ssl_ad.errors.UserInputError`
whose single line names every bad key, its value and what is allowed.

Also here, because training and the ablation sweep both need them: flattening a
config to dotted keys and comparing two of them (:func:`flat_config`, :func:`config_diff`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ssl_ad.errors import UserInputError
from ssl_ad.models.variants import SIZE_KEYS, VARIANT_HELP, VARIANT_PATTERN, apply_variant

_INF = math.inf


def _fmt_bound(x: float) -> str:
    return str(int(x)) if x == int(x) else repr(x)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class Number:
    """A real number in an interval written as text: ``"(0, 1)"``, ``"[0, 1)"``, ``"[1, inf)"``."""

    interval: str
    integer: bool = False

    def __post_init__(self):
        m = re.fullmatch(r"\s*([\[(])\s*(\S+?)\s*,\s*(\S+?)\s*([\])])\s*", self.interval)
        if not m:
            raise ValueError(f"bad interval {self.interval!r}")
        object.__setattr__(self, "_bounds", (m[1] == "(", float(m[2]), float(m[3]), m[4] == ")"))

    def ok(self, value: Any) -> bool:
        if not _is_number(value) or not math.isfinite(value):
            return False
        if self.integer and not isinstance(value, int):
            return False
        lo_open, lo, hi, hi_open = self._bounds
        above = value > lo if lo_open else value >= lo
        below = value < hi if hi_open else value <= hi
        return above and below

    def describe(self) -> str:
        lo_open, lo, hi, hi_open = self._bounds
        kind = "an integer" if self.integer else "a number"
        fmt = _fmt_bound
        if hi == _INF and lo == -_INF:
            return kind
        if hi == _INF:
            return f"{kind} {'>' if lo_open else '>='} {fmt(lo)}"
        if lo == -_INF:
            return f"{kind} {'<' if hi_open else '<='} {fmt(hi)}"
        return f"{kind} in {'(' if lo_open else '['}{fmt(lo)}, {fmt(hi)}{')' if hi_open else ']'}"


def Int(interval: str) -> Number:  # reads as a type in the table
    return Number(interval, integer=True)


@dataclasses.dataclass(frozen=True)
class Choice:
    options: tuple[Any, ...]

    def ok(self, value: Any) -> bool:
        return any(type(value) is type(o) and value == o for o in self.options)

    def describe(self) -> str:
        return "one of " + ", ".join(repr(o) for o in self.options)


@dataclasses.dataclass(frozen=True)
class Entries:
    """A tuple: ``lengths`` allowed, each entry checked by ``each`` (or by ``per_entry`` position)."""

    each: Number | None = None
    lengths: tuple[int, ...] = ()
    per_entry: tuple[Number, ...] = ()
    ordered: bool = False  # entries non-decreasing (a (lo, hi) range)
    what: str = ""

    def ok(self, value: Any) -> bool:
        if not isinstance(value, (tuple, list)):
            return False
        lengths = self.lengths or ((len(self.per_entry),) if self.per_entry else ())
        if lengths and len(value) not in lengths:
            return False
        rules = self.per_entry or (self.each,) * len(value)
        if not all(r.ok(v) for r, v in zip(rules, value)):
            return False
        return not self.ordered or all(a <= b for a, b in itertools.pairwise(value))

    def describe(self) -> str:
        if self.what:
            return self.what
        n = self.lengths or ((len(self.per_entry),) if self.per_entry else ())
        size = f"{' or '.join(map(str, n))} " if n else ""
        return f"a tuple of {size}entries, each {self.each.describe()}" + (", ascending" if self.ordered else "")


@dataclasses.dataclass(frozen=True)
class Pattern:
    """A string that matches a regular expression as a whole (``re.fullmatch``); ``what`` says it in words."""

    regex: str
    what: str

    def ok(self, value: Any) -> bool:
        return isinstance(value, str) and re.fullmatch(self.regex, value) is not None

    def describe(self) -> str:
        return self.what


def Pair(each: Number, what: str) -> Entries:
    """A ``(lo, hi)`` range: two entries, each ``each``, lo <= hi."""
    return Entries(each=each, lengths=(2,), ordered=True, what=what)


PROBABILITY = Number("[0, 1]")
POSITIVE = Number("(0, inf)")
NON_NEGATIVE = Number("[0, inf)")
AT_LEAST_1 = Int("[1, inf)")
COUNT = Int("[0, inf)")
CROP_SCALE = Pair(Number("(0, 1]"), "(lo, hi) with 0 < lo <= hi <= 1")
K_RANGE = Pair(Int("[1, inf)"), "(lo, hi) integers with 1 <= lo <= hi")

Rule = Number | Choice | Entries | Pattern

# dotted key -> rule. Training keys (ssl_ad/config_defaults.py base_config, mae_block,
# dino_block, multicrop_data, the data sets' own keys) and evaluation keys (eval_config) share
# one table: keys both have (batch_size, seed, model.*, data.*) mean the same in both.
RULES: dict[str, Rule] = {
    # --- run
    "method": Choice(("mae", "dino")),
    "seed": Int("[0, 4294967295]"),
    "total_steps": AT_LEAST_1,
    "batch_size": AT_LEAST_1,
    "checkpoint_every": AT_LEAST_1,
    "log_every": AT_LEAST_1,
    "keep_checkpoints": AT_LEAST_1,
    # --- model
    "model.variant": Pattern(VARIANT_PATTERN, VARIANT_HELP),  # ssl_ad.models.variants.decode_variant
    "model.image_size": AT_LEAST_1,
    "model.patch_size": AT_LEAST_1,
    "model.width": AT_LEAST_1,
    "model.depth": AT_LEAST_1,
    "model.num_heads": AT_LEAST_1,
    "model.mlp_ratio": POSITIVE,
    "model.posemb": Choice(("learned", "sincos")),
    "model.drop_path_rate": Number("[0, 1)"),
    "model.dtype": Choice(("float32", "bfloat16")),
    "model.init": Choice(("reference", "dino", "mae", "xavier_legacy")),
    "model.posemb_interpolation": Choice(("torch_bicubic", "antialiased")),
    "model.cls_pos": Choice(("reference", "learned", "zero")),
    "model.scan_blocks": Choice((True, False)),  # parameter layout: stacked 'blocks' or block0..block{d-1}
    # --- data (single view and multi-crop)
    "data.max_per_class": COUNT,
    "data.load_size": COUNT,
    "data.threads": COUNT,
    "data.max_image_pixels": COUNT,  # Pillow's decompression-bomb limit; 0 = none
    "data.augment": Choice(("single", "multicrop")),
    "data.resize_mode": Choice(("crop", "pad", "stretch")),
    "data.crop_sampler": Choice(("torchvision", "tf_bounding_box")),
    "data.resize_antialias": Choice((True, False)),
    "data.augment_device": Choice((True, False)),
    "data.color_jitter_impl": Choice(("torchvision", "additive_brightness")),
    "data.crop_scale": CROP_SCALE,
    "data.mean": Entries(each=PROBABILITY, lengths=(1, 3)),
    "data.std": Entries(each=POSITIVE, lengths=(1, 3)),
    "data.global_size": AT_LEAST_1,
    "data.global_scale": CROP_SCALE,
    "data.local_size": AT_LEAST_1,
    "data.local_scale": CROP_SCALE,
    "data.num_local": COUNT,
    "data.global_blur": Entries(each=PROBABILITY, lengths=(2,)),
    "data.local_blur": PROBABILITY,
    "data.solarize_p": PROBABILITY,
    "data.color_jitter_p": PROBABILITY,
    "data.color_jitter": Entries(
        per_entry=(NON_NEGATIVE, NON_NEGATIVE, NON_NEGATIVE, Number("[0, 0.5]")),
        what="(brightness, contrast, saturation, hue), each >= 0, hue <= 0.5",
    ),
    "data.grayscale_p": PROBABILITY,
    "data.blur_sigma": Pair(POSITIVE, "(lo, hi) with 0 < lo <= hi"),
    # COCO 2017 single-label
    "data.min_area": COUNT,
    "data.box_margin": NON_NEGATIVE,
    # image folders / MVTec-like splits made from one folder
    "data.test_fraction": Number("(0, 1)"),
    "data.val_fraction": Number("(0, 1)"),
    # 'folder' (anomalib Folder): share of data.normal_dir held out for 'test'
    "data.normal_test_fraction": Number("(0, 1)"),
    # --- predict.py (ssl_ad.evaluation.predict)
    "fpr": Number("(0, 1)"),
    "folds": Int("[2, inf)"),
    "overlays": COUNT,
    "pixel_size": AT_LEAST_1,
    "resize_mode": Choice(("crop", "pad", "stretch")),
    "scorer": Choice(("knn", "mahalanobis", "kmeans", "gmm_kmeans", "gmm")),
    # --- the AD monitor during training (ssl_ad.evaluation.monitor)
    "monitor.every_steps": COUNT,
    "monitor.max_bank": COUNT,
    "monitor.pooling": Choice(("cls", "mean", "cls+mean")),
    "monitor.k": AT_LEAST_1,
    "monitor.metric": Choice(("cosine", "l2")),
    "monitor.pca_dims": COUNT,
    "monitor.batch_size": AT_LEAST_1,
    # --- optimiser
    "optim.base_lr": POSITIVE,
    "optim.min_lr": NON_NEGATIVE,
    "optim.warmup_steps": COUNT,
    "optim.b1": Number("[0, 1)"),
    "optim.b2": Number("[0, 1)"),
    "optim.weight_decay": NON_NEGATIVE,
    "optim.weight_decay_end": NON_NEGATIVE,
    "optim.clip_norm": NON_NEGATIVE,
    "optim.freeze_steps": COUNT,
    "optim.clip_mode": Choice(("reference", "per_tensor", "global")),
    # --- MAE
    "mae.mask_ratio": Number("(0, 1)"),
    "mae.decoder_width": AT_LEAST_1,
    "mae.decoder_depth": COUNT,
    "mae.decoder_heads": AT_LEAST_1,
    # --- DINO
    "dino.out_dim": Int("[2, inf)"),
    "dino.hidden_dim": AT_LEAST_1,
    "dino.bottleneck_dim": AT_LEAST_1,
    "dino.num_layers": AT_LEAST_1,
    "dino.pooling": Choice(("cls", "mean", "cls+mean")),
    "dino.student_temp": POSITIVE,
    "dino.teacher_temp": POSITIVE,
    "dino.warmup_teacher_temp": POSITIVE,
    "dino.warmup_teacher_temp_steps": COUNT,
    "dino.momentum_teacher": PROBABILITY,
    "dino.center_momentum": PROBABILITY,
    "dino.koleo_loss_weight": NON_NEGATIVE,
    "dino.centering": Choice(("centering", "sinkhorn_knopp")),
    "dino.sinkhorn_iterations": AT_LEAST_1,
    "dino.ibot_loss_weight": NON_NEGATIVE,
    "dino.ibot_mask_ratio": Number("(0, 1)"),
    "dino.ibot_mask_shape": Choice(("rand",)),
    "dino.ibot_teacher_temp": POSITIVE,
    "dino.ibot_warmup_teacher_temp": POSITIVE,
    # --- evaluation (eval_config)
    "step": Int("[-1, inf)"),
    "pca_dims": COUNT,
    "pca_residual": Choice(("auto", "always", "never")),
    "max_train_per_round": COUNT,
    "tsne_points": COUNT,
    "scorer_args.knn.k": AT_LEAST_1,
    "scorer_args.knn.metric": Choice(("cosine", "l2")),
    "scorer_args.mahalanobis.shrinkage": Choice(("ledoit_wolf",)),
    "scorer_args.kmeans.k_range": K_RANGE,
    "scorer_args.kmeans.n_init": AT_LEAST_1,
    "scorer_args.kmeans.elbow_samples": COUNT,  # 0 = all normals
    "scorer_args.gmm_kmeans.k_range": K_RANGE,
    "scorer_args.gmm_kmeans.drop_fraction": Number("[0, 1)"),
    "scorer_args.gmm_kmeans.n_init": AT_LEAST_1,
    "scorer_args.gmm_kmeans.elbow_samples": COUNT,  # 0 = all normals
    "scorer_args.gmm.k_range": K_RANGE,
    "scorer_args.gmm.covariance_type": Choice(("full", "tied", "diag", "spherical")),
    "scorer_args.gmm.n_init": AT_LEAST_1,
    "scorer_args.gmm.elbow_samples": COUNT,  # 0 = all normals
    "mae_recon.num_masks": AT_LEAST_1,
    "pixel.k": AT_LEAST_1,
    "pixel.max_bank": COUNT,
    "pixel.metric": Choice(("l2", "cosine")),
    "pixel.sigma": NON_NEGATIVE,
    "pixel.max_fpr": Number("(0, 1]"),
    "pixel.overlays": COUNT,
}


@dataclasses.dataclass(frozen=True)
class Link:
    """A rule between keys: ``holds(values)`` over ``keys`` (checked only when all are present
    and each passed its own rule)."""

    keys: tuple[str, ...]
    holds: Callable[..., bool]
    what: str
    when: Callable[[Mapping[str, Any]], bool] = lambda flat: True


def _multicrop(flat: Mapping[str, Any]) -> bool:
    return flat.get("data.augment") == "multicrop"


def _augment_device(flat: Mapping[str, Any]) -> bool:
    return flat.get("data.augment_device") is True


MODEL_LINKS = (
    Link(("model.width", "model.num_heads"), lambda w, h: w % h == 0,
         "model.width must be a multiple of model.num_heads"),
    Link(("model.image_size", "model.patch_size"), lambda s, p: s % p == 0,
         "model.image_size must be a multiple of model.patch_size"),
    Link(("model.width",), lambda w: w % 4 == 0, "model.width must be a multiple of 4 with posemb='sincos'",
         when=lambda flat: flat.get("model.posemb") == "sincos"),
)
TRAIN_LINKS = MODEL_LINKS + (
    Link(("data.global_size", "model.patch_size"), lambda s, p: s % p == 0,
         "data.global_size must be a multiple of model.patch_size", when=_multicrop),
    Link(("data.local_size", "model.patch_size"), lambda s, p: s % p == 0,
         "data.local_size must be a multiple of model.patch_size", when=_multicrop),
    Link(("mae.decoder_width", "mae.decoder_heads"), lambda w, h: w % h == 0,
         "mae.decoder_width must be a multiple of mae.decoder_heads", when=lambda flat: flat.get("method") == "mae"),
    Link(("mae.decoder_width",), lambda w: w % 4 == 0,
         "mae.decoder_width must be a multiple of 4 (sincos position embedding)",
         when=lambda flat: flat.get("method") == "mae"),
    Link(("optim.min_lr", "optim.base_lr", "batch_size"), lambda lo, base, b: lo <= base * b / 256.0,
         "optim.min_lr must not exceed the peak lr = optim.base_lr * batch_size / 256"),
    # ssl_ad.data.device_augment has the reference crop sampler and colour jitter only.
    Link(("data.crop_sampler",), lambda v: v == "torchvision",
         "data.augment_device=True needs data.crop_sampler='torchvision'", when=_augment_device),
    Link(("data.color_jitter_impl",), lambda v: v == "torchvision",
         "data.augment_device=True needs data.color_jitter_impl='torchvision'", when=_augment_device),
)
EVAL_LINKS = MODEL_LINKS


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=repr))


def _flatten(config: Any, prefix: str, leaf: Callable[[Any], Any]) -> dict[str, Any]:
    data = config.to_dict() if hasattr(config, "to_dict") else config
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping) or hasattr(value, "to_dict"):
            out.update(_flatten(value, f"{prefix}{key}.", leaf))
        else:
            out[f"{prefix}{key}"] = leaf(value)
    return out


def flat_config(config: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of a ConfigDict or nested dict, JSON-normalised (tuples -> lists),
    as config.json stores it."""
    return _flatten(config, prefix, _plain)


def _raw_flat(config: Any, prefix: str = "") -> dict[str, Any]:
    return _flatten(config, prefix, lambda value: value)


def _fmt(value: Any) -> str:
    return repr(tuple(value)) if isinstance(value, list) else repr(value)


def _resolve_variant_flat(flat: dict[str, Any], bad: list[str]) -> set[str]:
    """Puts the sizes ``model.variant`` stands for into ``flat`` (apply_variant on a copy of the
    model keys); on a conflict appends its message to ``bad`` and returns the model size keys
    (their links are then skipped)."""
    model = {k[len("model."):]: v for k, v in flat.items() if k.startswith("model.")}
    try:
        apply_variant(model)
    except UserInputError as e:
        bad.append(str(e))
        return {f"model.{k}" for k in SIZE_KEYS}
    flat.update({f"model.{k}": v for k, v in model.items()})
    return set()


def violations(config: Any, links: Sequence[Link] = ()) -> list[str]:
    """'key=value (allowed: ...)' for every key that breaks its rule, a size key that contradicts
    ``model.variant``, then every broken link (checked with the sizes the variant stands for)."""
    flat = _raw_flat(config)
    bad = []
    for key, rule in RULES.items():
        if key in flat and not rule.ok(flat[key]):
            bad.append(f"{key}={_fmt(flat[key])} (allowed: {rule.describe()})")
    failed = {b.split("=", 1)[0] for b in bad}
    if "model.variant" not in failed:
        failed |= _resolve_variant_flat(flat, bad)
    for link in links:
        if any(k not in flat or k in failed for k in link.keys) or not link.when(flat):
            continue
        values = [flat[k] for k in link.keys]
        if not link.holds(*values):
            shown = ", ".join(f"{k}={_fmt(v)}" for k, v in zip(link.keys, values))
            bad.append(f"{shown} ({link.what})")
    return bad


def _raise(kind: str, bad: list[str]) -> None:
    if bad:
        raise UserInputError(f"invalid {kind} config: " + "; ".join(bad))


def resolve_model_variant(config: Any) -> None:
    """Writes the sizes ``model.variant`` stands for into ``config.model``, in place
    (:func:`ssl_ad.models.variants.apply_variant`); a config without a model block is left alone.

    Raises:
      UserInputError: an unknown variant, or a size key that contradicts it (validation reports
        both first, among the config's other violations).
    """
    model = config.get("model") if hasattr(config, "get") else None
    if model is not None and hasattr(model, "get"):
        apply_variant(model)


def validate_train_config(config: Any) -> None:
    """Raises UserInputError (one line naming every bad key, its value and the allowed range);
    a valid config then gets ``model.variant`` resolved in place (:func:`resolve_model_variant`),
    so the run and its saved config.json hold the sizes it stands for."""
    _raise("training", violations(config, TRAIN_LINKS))
    resolve_model_variant(config)


def validate_eval_config(config: Any) -> None:
    """Raises UserInputError (one line naming every bad key, its value and the allowed range);
    a valid config then gets ``model.variant`` resolved in place (:func:`resolve_model_variant`)."""
    _raise("evaluation", violations(config, EVAL_LINKS))
    resolve_model_variant(config)


def validate_predict_config(config: Any) -> None:
    """Raises UserInputError (one line naming every bad key, its value and the allowed range)."""
    _raise("prediction", violations(config))


def numeric_keys(config: Any) -> list[str]:
    """Dotted keys holding a number or a tuple of numbers (what :data:`RULES` must cover)."""
    out = []
    for key, value in _raw_flat(config).items():
        if _is_number(value) or (isinstance(value, (tuple, list)) and value and all(_is_number(v) for v in value)):
            out.append(key)
    return out


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{key: (old, new)} of two flat configs; a key missing on one side has the value :data:`ABSENT`."""
    out = {}
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, ABSENT), new.get(key, ABSENT)
        if a != b:
            out[key] = (a, b)
    return out


class _Absent:
    def __repr__(self) -> str:
        return "<absent>"


ABSENT: Any = _Absent()
