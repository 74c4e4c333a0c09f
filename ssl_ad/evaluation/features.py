"""Feature vectors of every source (raw pixels, a random ViT, checkpoints) for the train and test
splits, cached as ``.npz`` files in ``outdir/features``.

:class:`FeatureBuilder` is the public interface: ``pixels()``, ``random_init(...)`` and
``checkpoint(...)`` return :class:`FeatureSet` s; :func:`cached_array` is the one cache
primitive (also used by the pixel-level maps).

Every cache file stores, beside ``features``, a ``fingerprint`` (a JSON string, no pickle) of
everything the features were made from: the images (:attr:`ImageSplit.fingerprint`: a hash of the
split's uint8 pixels and labels), the model's parameters (a hash of every leaf: a retrained or
replaced checkpoint differs even at the same path and step), the model / method configuration,
and the evaluation keys that change the numbers (pooling, image size, mean/std, l2_normalize,
num_masks, seed, batch size for the MAE maps). A file is reused only when its fingerprint
matches (one log line per source); otherwise the features are recomputed and the file replaced
atomically, with one log line naming what changed. Files without a fingerprint (made by an
older ssl_ad) are recomputed. Files holding pickled objects are refused, never loaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

import ssl_ad
from ssl_ad.config_lists import as_names
from ssl_ad.data.pipeline import preprocess_eval
from ssl_ad.data.sources import ImageSplit, array_digest
from ssl_ad.errors import UserInputError
from ssl_ad.evaluation import embedding
from ssl_ad.models.vit import vit_from_config

log = logging.getLogger(__name__)

EMBEDDING, RECON = "embedding", "recon"
CACHE_FORMAT = 2  # bump when the feature computation changes: every older file is then recomputed
REUSED, NEW = "reused", "new"
PART_NAMES = {
    "images": "the images",
    "params": "the model parameters (checkpoint)",
    "model": "the model config",
    "method": "the method config",
    "code": "the ssl_ad version",
}


@dataclasses.dataclass
class FeatureSet:
    """Train and test features of one source; ``kind`` says which scorers apply."""

    name: str
    kind: str
    train: np.ndarray
    test: np.ndarray
    seconds: float
    info: dict[str, Any]


def params_digest(params: Any) -> str:
    """sha256 over every leaf (path, dtype, shape, bytes) of a parameter tree."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    paths = [jax.tree_util.keystr(path) for path, _ in leaves]
    return array_digest(*(np.asarray(jax.device_get(leaf)) for _, leaf in leaves), labels=paths)


def signature(obj: Any) -> str:
    """A stable text of a model or method's configuration (Flax modules print their fields)."""
    if dataclasses.is_dataclass(obj):
        text = repr(obj)
    else:
        text = repr(sorted((k, repr(v)) for k, v in vars(obj).items() if not k.startswith("_")))
    return re.sub(r" at 0x[0-9a-fA-F]+", "", text)


def _floats(values: Any) -> list[float]:
    return [float(v) for v in np.atleast_1d(np.asarray(values, np.float64))]


def fingerprint(**parts: Any) -> dict[str, Any]:
    """A JSON-able dict of what a cache file is made from; long texts are stored as hashes."""
    out: dict[str, Any] = {"code": f"ssl_ad {ssl_ad.__version__}, cache format {CACHE_FORMAT}"}
    for key, value in parts.items():
        if isinstance(value, str) and len(value) > 80:
            value = hashlib.sha256(value.encode()).hexdigest()
        out[key] = value
    return json.loads(json.dumps(out))


def recon_fingerprint(method: Any, params: Any, split: ImageSplit, image_size: int, norm: Any, num_masks: int,
                      seed: int, batch_size: int) -> dict[str, Any]:
    """Fingerprint of MAE reconstruction-error maps (shared by the mae_recon scorer and the pixel maps)."""
    return fingerprint(
        kind=RECON, images=split.fingerprint, method=signature(method), params=params_digest(params),
        image_size=int(image_size), mean=_floats(norm.mean), std=_floats(norm.std), num_masks=int(num_masks),
        seed=int(seed), batch_size=int(batch_size),
    )


def _changes(stored: dict[str, Any] | None, wanted: dict[str, Any]) -> str:
    if stored is None:
        return "it has no fingerprint (made by an older ssl_ad)"
    keys = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
    return "changed: " + ", ".join(PART_NAMES.get(k, k) for k in keys)


def _load_or_compute(path: str, compute: Callable[[], np.ndarray], wanted: dict[str, Any]) -> tuple[np.ndarray, str]:
    """(features, status): REUSED, NEW, or why the file was recomputed."""
    status = NEW
    if os.path.exists(path):
        try:
            with np.load(path, allow_pickle=False) as f:
                features = f["features"]  # first: a pickled file is refused whatever else it holds
                stored = json.loads(str(f["fingerprint"]))["parts"] if "fingerprint" in f.files else None
        except ValueError as e:
            if "allow_pickle" in str(e):  # numpy refuses object arrays: loading them would unpickle
                raise UserInputError(
                    f"cached features {path} hold pickled Python objects, which are never loaded "
                    "(allow_pickle=False); delete the file to recompute the features"
                ) from None
            raise UserInputError(f"cached features {path} cannot be read ({e}); delete the file to recompute them") from None
        except (OSError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise UserInputError(
                f"cached features {path} cannot be read ({type(e).__name__}: {e}); delete the file to recompute them"
            ) from None
        if stored == wanted:
            return features, REUSED
        status = _changes(stored, wanted)
    features = compute()
    record = json.dumps({"parts": wanted, "digest": hashlib.sha256(json.dumps(wanted, sort_keys=True).encode()).hexdigest()})
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-", suffix=".npz")
    os.close(fd)
    try:
        np.savez(tmp, features=features, fingerprint=np.array(record))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return features, status


def _log_status(what: str, paths: list[str], statuses: list[str]) -> None:
    """One line per source: reused, or recomputed and why (nothing for first computations)."""
    files = ", ".join(os.path.basename(p) for p in paths)
    if all(s == REUSED for s in statuses):
        log.info("features %s: reusing cached %s (fingerprint matches: same images, parameters and settings)",
                 what, files)
        return
    stale = sorted({s for s in statuses if s not in (REUSED, NEW)})
    if stale:
        log.info("features %s: recomputed, the cached file(s) %s were made from other inputs (%s)",
                 what, files, "; ".join(stale))


def cached_array(path: str, compute: Callable[[], np.ndarray], *, fingerprint: dict[str, Any]) -> tuple[np.ndarray, bool]:
    """Loads features from ``path`` (.npz, no pickle) when its stored fingerprint equals ``fingerprint``;
    otherwise computes them and saves them with it, atomically. Returns (features, reused)."""
    features, status = _load_or_compute(path, compute, fingerprint)
    _log_status(os.path.splitext(os.path.basename(path))[0], [path], [status])
    return features, status == REUSED


@dataclasses.dataclass
class RandomInit:
    """One 'before SSL' baseline: a freshly initialised ViT of one architecture.

    ``name`` is ``random_init[<checkpoint names joined by +>]`` (the checkpoints with this
    architecture), or ``random_init`` when there is no checkpoint; ``model`` is the ViT as the
    training method builds it (same widths, patch, position embedding and init rule), ``norm``
    the data mean/std the images are normalised with.
    """

    name: str
    model: Any
    norm: Any
    pairs: tuple[str, ...] = ()


def random_init_baselines(checkpoints: Sequence[Any], config: Any) -> list[RandomInit]:
    """One random-init baseline per distinct architecture (and normalisation) among ``checkpoints``
    (LoadedCheckpoint), in the order they first appear; with none, one built from ``config.model``.

    A DINO patch-7 model and an MAE patch-4 model thus each get their own "before SSL" row.
    """
    if not checkpoints:
        return [RandomInit("random_init", vit_from_config(config.model, drop_path_rate=0.0), config.data)]
    groups: dict[str, RandomInit] = {}
    for loaded in checkpoints:
        model = loaded.encoder()
        key = signature(model) + repr((_floats(loaded.config.data.mean), _floats(loaded.config.data.std)))
        if key in groups:
            groups[key].pairs += (loaded.name,)
        else:
            groups[key] = RandomInit("", model, loaded.config.data, (loaded.name,))
    for g in groups.values():
        g.name = f"random_init[{'+'.join(g.pairs)}]"
    return list(groups.values())


class FeatureBuilder:
    """Computes (or reloads) the features of each source for the train and test splits."""

    def __init__(self, config: Any, train: ImageSplit, test: ImageSplit, feature_dir: str):
        self.config, self.train, self.test, self.dir = config, train, test, feature_dir
        os.makedirs(feature_dir, exist_ok=True)

    def cache_path(self, source: str, step: int, split: ImageSplit, extra: str) -> str:
        """The .npz file of ``source`` at ``step`` on ``split``; ``extra`` tags what was computed."""
        return os.path.join(self.dir, f"{source}-step{step}-{split.name}-{split.split}-{extra}.npz")

    def _both(self, source: str, step: int, extra: str, compute, wanted: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, float]:
        """Features of train and test (cached, verified against ``wanted`` plus each split's images)."""
        t0 = time.perf_counter()
        out, paths, statuses = [], [], []
        for split in (self.train, self.test):
            path = self.cache_path(source, step, split, extra)
            feats, status = _load_or_compute(path, lambda s=split: compute(s), dict(wanted, images=split.fingerprint))
            if feats.shape[0] != len(split):
                raise UserInputError(f"cached features {path} do not match the split")
            embedding.check_features_finite(feats, source)
            out.append(feats)
            paths.append(path)
            statuses.append(status)
        _log_status(f"{source} ({extra})", paths, statuses)
        return out[0], out[1], time.perf_counter() - t0

    def pixels(self) -> FeatureSet:
        wanted = fingerprint(kind="pixels")
        tr, te, sec = self._both("pixels", 0, "raw", lambda s: embedding.pixel_features(s.images), wanted)
        return FeatureSet("pixels", EMBEDDING, tr, te, sec, {"source": "raw pixels"})

    def _vit_sets(self, name: str, step: int, model, params, data_norm, which: str = "",
                  about: dict[str, Any] | None = None) -> list[FeatureSet]:
        cfg = self.config
        sets = []
        size = model.image_size
        images = {}
        base = dict(
            kind=EMBEDDING, model=signature(model), params=params_digest(params), which=which or "default",
            image_size=int(size), mean=_floats(data_norm.mean), std=_floats(data_norm.std),
            l2_normalize=bool(cfg.l2_normalize), **(about or {}),
        )

        def prepared(split: ImageSplit) -> np.ndarray:
            if split.split not in images:
                images[split.split] = preprocess_eval(split.images, size, data_norm.mean, data_norm.std)
            return images[split.split]

        for pooling in as_names(cfg.pooling, "pooling"):
            tag = "-".join(t for t in (pooling, which, f"{size}px", "l2" if cfg.l2_normalize else "") if t)
            tr, te, sec = self._both(
                name,
                step,
                tag,
                lambda s, p=pooling: embedding.embed_images(
                    model, params, prepared(s), p, cfg.batch_size, cfg.l2_normalize
                ),
                fingerprint(pooling=pooling, **base),
            )
            label = name if len(as_names(cfg.pooling, "pooling")) == 1 else f"{name}/{pooling}"
            sets.append(FeatureSet(label, EMBEDDING, tr, te, sec, {"pooling": pooling, "step": step}))
        return sets

    def random_init(self, baseline: RandomInit) -> list[FeatureSet]:
        """Features of a random-init baseline (parameters drawn with ``config.seed``)."""
        params = embedding.random_init_params(baseline.model, self.config.seed)
        return self._vit_sets(baseline.name, 0, baseline.model, params, baseline.norm,
                              about={"seed": int(self.config.seed)})

    def checkpoint(self, loaded: embedding.LoadedCheckpoint) -> list[FeatureSet]:
        cfg = self.config
        which = cfg.which if loaded.config.method == "dino" else "default"
        model = loaded.encoder()
        params = loaded.encoder_params(which)
        sets = self._vit_sets(loaded.name, loaded.step, model, params, loaded.config.data, which if which != "default" else "")
        if loaded.can_reconstruct and "mae_recon" in as_names(cfg.scorers, "scorers"):
            size, norm = model.image_size, loaded.config.data
            masks = int(cfg.mae_recon.num_masks)

            def maps(split: ImageSplit) -> np.ndarray:
                x = preprocess_eval(split.images, size, norm.mean, norm.std)
                err = embedding.reconstruction_error_maps(loaded.method, loaded.params, x, masks, cfg.seed, cfg.batch_size)
                return err.reshape(err.shape[0], -1)

            wanted = recon_fingerprint(loaded.method, loaded.params, self.train, size, norm, masks, cfg.seed, cfg.batch_size)
            tr, te, sec = self._both(loaded.name, loaded.step, f"recon{masks}-{size}px", maps, wanted)
            sets.append(FeatureSet(loaded.name, RECON, tr, te, sec, {"step": loaded.step, "num_masks": masks}))
        return sets
