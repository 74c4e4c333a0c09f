"""tf.data pipelines: a resumable, per-host-sharded training stream and eval preprocessing.

The training stream is a pure function of (seed, step): step ``s`` holds the
examples at global positions ``s*B .. s*B+B-1`` of an endless sequence of
epochs, each a permutation of the split drawn from (seed, epoch), and every
example's augmentation is seeded by (seed, position). Resuming at step ``s``
therefore replays exactly what an uninterrupted run would have seen, and
host ``p`` of ``P`` takes the contiguous block ``[p*B/P, (p+1)*B/P)`` of
each global batch, so hosts' shards are disjoint and together complete.
"""

from __future__ import annotations

from typing import Any, Iterator

import ml_collections
import numpy as np
import tensorflow as tf

from ssl_ad.data import augment
from ssl_ad.data.split import ImageSplit
from ssl_ad.errors import UserInputError


def augment_config(config: Any) -> ml_collections.ConfigDict:
    """Flattens what the augmentation needs from ``config.data`` and ``config.model``."""
    fields = dict(config.data)
    fields["image_size"] = config.model.image_size
    fields.setdefault("global_size", config.model.image_size)
    return ml_collections.ConfigDict(fields)


def batch_positions(step: tf.Tensor, global_batch: int, local_batch: int, process_index: int) -> tf.Tensor:
    """Global stream positions that ``process_index`` reads at ``step``."""
    start = step * global_batch + process_index * local_batch
    return start + tf.range(local_batch, dtype=tf.int64)


def example_indices(positions: tf.Tensor, num_examples: int, seed: int) -> tf.Tensor:
    """Maps stream positions to example indices: epoch e is the permutation argsort(U(seed, e))."""
    n = tf.constant(num_examples, tf.int64)
    epochs, offsets = positions // n, positions % n

    def perm(epoch):
        noise = tf.random.stateless_uniform([num_examples], tf.stack([tf.constant(seed, tf.int64), epoch]))
        return tf.argsort(noise, stable=True)

    first, last = perm(epochs[0]), perm(epochs[-1])
    return tf.cast(
        tf.where(epochs == epochs[0], tf.gather(first, offsets), tf.gather(last, offsets)), tf.int64
    )


def train_dataset(
    config: Any,
    split: ImageSplit,
    start_step: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> tf.data.Dataset:
    """Batches (dicts of float32 arrays) for steps ``start_step .. config.total_steps - 1`` of this host.

    With ``data.augment_device=True`` a batch is ``{'image': uint8 (B, H, W, C)}``, the gathered
    images unaugmented (same positions, same order): the device makes the crops
    (:func:`ssl_ad.data.device_augment.batch_augmenter`).
    """
    global_batch = int(config.batch_size)
    if global_batch % process_count:
        raise UserInputError(f"batch_size {global_batch} is not divisible by the {process_count} processes")
    local_batch = global_batch // process_count
    num_examples = len(split)
    if local_batch > num_examples:
        raise UserInputError(f"batch_size {global_batch} is larger than the {num_examples} training images")
    recipe_name = config.data.get("augment", "single")
    if recipe_name not in augment.RECIPES:
        raise UserInputError(f"unknown data.augment {recipe_name!r}; choose from {sorted(augment.RECIPES)}")
    recipe = augment.RECIPES[recipe_name]
    aug = augment_config(config)
    seed = int(config.seed)
    images = tf.convert_to_tensor(split.images)

    def positions_and_indices(step):
        pos = batch_positions(step, global_batch, local_batch, process_index)
        return tf.data.Dataset.from_tensor_slices((pos, example_indices(pos, num_examples, seed)))

    def make_example(pos, idx):
        image = augment.to_float_rgb(tf.gather(images, idx))
        return recipe(image, tf.stack([tf.constant(seed, tf.int64), pos]), aug)

    def gather_step(step):  # data.augment_device: one gather per step, the device makes the crops
        pos = batch_positions(step, global_batch, local_batch, process_index)
        return {"image": tf.gather(images, example_indices(pos, num_examples, seed))}

    ds = tf.data.Dataset.range(start_step, int(config.total_steps))
    if config.data.get("augment_device", False):
        ds = ds.map(gather_step, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    else:
        ds = ds.flat_map(positions_and_indices)
        ds = ds.map(make_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(local_batch, drop_remainder=True)
    options = tf.data.Options()
    options.deterministic = True
    options.threading.private_threadpool_size = int(config.data.get("threads", 0)) or 0
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def train_batches(config: Any, split: ImageSplit, start_step: int, **kwargs: Any) -> Iterator[dict[str, np.ndarray]]:
    """NumPy view of :func:`train_dataset`."""
    for batch in train_dataset(config, split, start_step, **kwargs).as_numpy_iterator():
        yield batch


def preprocess_eval(images: np.ndarray, image_size: int, mean, std, batch: int = 512) -> np.ndarray:
    """uint8 (N, H, W, C) -> normalised float32 (N, S, S, 3), resized without cropping."""
    out = []
    for start in range(0, images.shape[0], batch):
        x = augment.to_float_rgb(tf.convert_to_tensor(images[start:start + batch]))
        if x.shape[1] != image_size or x.shape[2] != image_size:
            x = tf.clip_by_value(tf.image.resize(x, [image_size, image_size], method="bicubic", antialias=True), 0, 1)
        out.append(augment.normalize(x, mean, std).numpy())
    return np.concatenate(out, axis=0) if out else np.zeros((0, image_size, image_size, 3), np.float32)
