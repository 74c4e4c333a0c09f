"""Stateless tf.image augmentations (MAE's crop/flip, DINO's multi-crop recipe).

Every random choice takes an explicit ``seed`` (a shape-[2] int tensor) so an
example's augmentation depends only on (run seed, example position): the
training stream is reproducible and resumable.
"""

from __future__ import annotations

import math
from typing import Any

import tensorflow as tf


def split_seed(seed: tf.Tensor, num: int) -> list[tf.Tensor]:
    """``num`` independent seeds derived from one."""
    return tf.unstack(tf.random.experimental.stateless_split(seed, num))


def to_float_rgb(image: tf.Tensor) -> tf.Tensor:
    """uint8 (H, W, 1|3|4) -> float32 RGB in [0, 1]; grey is repeated, alpha dropped."""
    image = tf.image.convert_image_dtype(image, tf.float32)
    channels = image.shape[-1]
    if channels == 1:
        return tf.image.grayscale_to_rgb(image)
    if channels == 4:
        return image[..., :3]
    return image


def random_resized_crop(
    image: tf.Tensor, seed: tf.Tensor, size: int, scale: tuple[float, float], ratio=(3 / 4, 4 / 3)
) -> tf.Tensor:
    """Inception-style crop covering ``scale`` of the area, resized to size x size (bicubic)."""
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image),
        bounding_boxes=tf.zeros([1, 0, 4]),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=ratio,
        area_range=scale,
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    crop = tf.slice(image, begin, crop_size)
    out = tf.clip_by_value(tf.image.resize(crop, [size, size], method="bicubic"), 0.0, 1.0)
    return tf.ensure_shape(out, [size, size, image.shape[-1]])  # tf.slice loses the static channel count


def maybe_flip(image: tf.Tensor, seed: tf.Tensor, enabled: bool) -> tf.Tensor:
    return tf.image.stateless_random_flip_left_right(image, seed) if enabled else image


def _coin(seed: tf.Tensor, p: float) -> tf.Tensor:
    return tf.random.stateless_uniform([], seed) < p


def color_jitter(image: tf.Tensor, seed: tf.Tensor, p: float, strength: tuple[float, float, float, float]) -> tf.Tensor:
    """With probability p: brightness, contrast, saturation, hue jitter (DINO: 0.4, 0.4, 0.2, 0.1)."""
    s = split_seed(seed, 5)
    b, c, sat, h = strength

    def jitter(x):
        x = tf.image.stateless_random_brightness(x, b, s[1])
        x = tf.image.stateless_random_contrast(x, 1 - c, 1 + c, s[2])
        x = tf.image.stateless_random_saturation(x, 1 - sat, 1 + sat, s[3])
        x = tf.image.stateless_random_hue(x, h, s[4])
        return tf.clip_by_value(x, 0.0, 1.0)

    return tf.cond(_coin(s[0], p), lambda: jitter(image), lambda: image)


def random_grayscale(image: tf.Tensor, seed: tf.Tensor, p: float) -> tf.Tensor:
    grey = tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(image))
    return tf.cond(_coin(seed, p), lambda: grey, lambda: image)


def gaussian_blur(image: tf.Tensor, seed: tf.Tensor, p: float, sigma_range: tuple[float, float]) -> tf.Tensor:
    """With probability p, a separable Gaussian blur with sigma ~ U(sigma_range) pixels."""
    if p <= 0.0:
        return image
    s = split_seed(seed, 2)
    sigma = tf.random.stateless_uniform([], s[1], sigma_range[0], sigma_range[1])
    radius = int(math.ceil(3 * sigma_range[1]))
    x = tf.range(-radius, radius + 1, dtype=tf.float32)
    kernel = tf.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / tf.reduce_sum(kernel)

    def blur(img):
        chans = img.shape[-1]
        kh = tf.tile(tf.reshape(kernel, [-1, 1, 1, 1]), [1, 1, chans, 1])
        kw = tf.tile(tf.reshape(kernel, [1, -1, 1, 1]), [1, 1, chans, 1])
        out = tf.nn.depthwise_conv2d(img[None], kh, [1, 1, 1, 1], "SAME")
        out = tf.nn.depthwise_conv2d(out, kw, [1, 1, 1, 1], "SAME")
        return out[0]

    return tf.cond(_coin(s[0], p), lambda: blur(image), lambda: image)


def solarize(image: tf.Tensor, seed: tf.Tensor, p: float) -> tf.Tensor:
    if p <= 0.0:
        return image
    solar = tf.where(image < 0.5, image, 1.0 - image)
    return tf.cond(_coin(seed, p), lambda: solar, lambda: image)


def normalize(image: tf.Tensor, mean, std) -> tf.Tensor:
    return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def dino_view(image: tf.Tensor, seed: tf.Tensor, size: int, scale, blur_p: float, solar_p: float, aug: Any) -> tf.Tensor:
    """One DINO view: crop, flip, colour jitter, grayscale, blur, solarisation (normalised later)."""
    s = split_seed(seed, 6)
    x = random_resized_crop(image, s[0], size, scale)
    x = maybe_flip(x, s[1], aug.hflip)
    x = color_jitter(x, s[2], aug.color_jitter_p, tuple(aug.color_jitter))
    x = random_grayscale(x, s[3], aug.grayscale_p)
    x = gaussian_blur(x, s[4], blur_p, tuple(aug.blur_sigma))
    return solarize(x, s[5], solar_p)


def multicrop(image: tf.Tensor, seed: tf.Tensor, aug: Any) -> dict[str, tf.Tensor]:
    """2 global views (blur 1.0 / 0.1, solarise 0 / 0.2) + ``aug.num_local`` local views (blur 0.5)."""
    seeds = split_seed(seed, 2 + max(aug.num_local, 1))
    glob = [
        dino_view(image, seeds[0], aug.global_size, tuple(aug.global_scale), aug.global_blur[0], 0.0, aug),
        dino_view(image, seeds[1], aug.global_size, tuple(aug.global_scale), aug.global_blur[1], aug.solarize_p, aug),
    ]
    out = {"global": tf.stack([normalize(v, aug.mean, aug.std) for v in glob])}
    if aug.num_local:
        local = [
            dino_view(image, seeds[2 + i], aug.local_size, tuple(aug.local_scale), aug.local_blur, 0.0, aug)
            for i in range(aug.num_local)
        ]
        out["local"] = tf.stack([normalize(v, aug.mean, aug.std) for v in local])
    return out


def single_view(image: tf.Tensor, seed: tf.Tensor, aug: Any) -> dict[str, tf.Tensor]:
    """MAE's view: random resized crop (scale 0.2-1.0 by default) and optional flip."""
    s = split_seed(seed, 2)
    x = random_resized_crop(image, s[0], aug.image_size, tuple(aug.crop_scale))
    x = maybe_flip(x, s[1], aug.hflip)
    return {"image": normalize(x, aug.mean, aug.std)}


RECIPES = {"single": single_view, "multicrop": multicrop}
