"""Stateless tf.image augmentations (MAE's crop/flip, DINO's multi-crop recipe).

Every random choice takes an explicit ``seed`` (a shape-[2] int tensor) so an
example's augmentation depends only on (run seed, example position): the
training stream is reproducible and resumable.

The defaults follow the reference code: facebookresearch/dino ``main_dino.py``
``DataAugmentationDINO`` and facebookresearch/mae ``main_pretrain.py``
(``RandomResizedCrop(input_size, scale=(0.2, 1.0), interpolation=3)``), i.e.
torchvision's ``RandomResizedCrop`` and ``ColorJitter``. ssl_ad's earlier
variants stay available under explicit ``data.*`` keys:

=====================  ===============================  ======================================
key                    default (reference)              earlier ssl_ad behaviour
=====================  ===============================  ======================================
``crop_sampler``       ``'torchvision'``                ``'tf_bounding_box'``
``resize_antialias``   ``True``                         ``False``
``color_jitter_impl``  ``'torchvision'``                ``'additive_brightness'``
=====================  ===============================  ======================================
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import tensorflow as tf

from ssl_ad.errors import UserInputError

CROP_SAMPLERS = ("torchvision", "tf_bounding_box")
COLOR_JITTER_IMPLS = ("torchvision", "additive_brightness")
# torchvision.transforms._functional_tensor.rgb_to_grayscale (ITU-R 601-2 luma, as PIL's convert("L")).
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)


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


def _choice(value: str, allowed: tuple[str, ...], key: str) -> str:
    if value not in allowed:
        raise UserInputError(f"unknown data.{key} {value!r}; choose from {list(allowed)}")
    return value


def _fallback_box(height, width, ratio):
    """torchvision's fallback (h, w): the whole image, narrowed to the nearest ratio in ``ratio``."""
    if isinstance(height, int) and isinstance(width, int):
        in_ratio = width / height
        if in_ratio < min(ratio):
            return float(round(width / min(ratio))), float(width)
        if in_ratio > max(ratio):
            return float(height), float(round(height * max(ratio)))
        return float(height), float(width)
    hf, wf = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    in_ratio = wf / hf
    fb_h = tf.where(in_ratio < min(ratio), tf.round(wf / min(ratio)), hf)
    fb_w = tf.where(in_ratio > max(ratio), tf.round(hf * max(ratio)), wf)
    return fb_h, fb_w


def _crop_box(height, width, seed: tf.Tensor, scale, ratio, attempts: int = 10) -> tuple[tf.Tensor, tf.Tensor]:
    """float32 (top, left) and (h, w) of :func:`torchvision_crop_box`, in few ops (it runs per view)."""
    static = isinstance(height, int) and isinstance(width, int)
    hf = float(height) if static else tf.cast(height, tf.float32)
    wf = float(width) if static else tf.cast(width, tf.float32)
    fb_h, fb_w = _fallback_box(height, width, ratio)
    if static:
        limit, fallback = tf.constant([[hf], [wf]]), tf.constant([[fb_h], [fb_w]])
        # Offset uniforms that give the centre crop: floor(u * (room + 1)) = room // 2.
        centre_u = tf.constant([(room // 2 + 0.5) / (room + 1) for room in (hf - fb_h, wf - fb_w)])
    else:
        limit, fallback = tf.reshape(tf.stack([hf, wf]), [2, 1]), tf.reshape(tf.stack([fb_h, fb_w]), [2, 1])
        fb_room = tf.reshape(limit - fallback, [2])
        centre_u = (tf.floor(fb_room / 2) + 0.5) / (fb_room + 1)
    # Columns 0..attempts-1: one attempt each (row 0 area fraction, row 1 half log aspect ratio);
    # the last column: the two offset uniforms (top, left).
    half_log = (math.log(ratio[0]) / 2, math.log(ratio[1]) / 2)
    low = tf.constant([[scale[0]] * attempts + [0.0], [half_log[0]] * attempts + [0.0]])
    high = tf.constant([[scale[1]] * attempts + [1.0], [half_log[1]] * attempts + [1.0]])
    t = tf.random.stateless_uniform([2, attempts + 1], seed, low, high)
    # h = sqrt(area / aspect) = sqrt(area) * exp(-log(aspect) / 2), w = sqrt(area) * exp(+log(aspect) / 2).
    root_area = math.sqrt(hf * wf) if static else tf.sqrt(hf * wf)
    hw = tf.round(root_area * tf.sqrt(t[0]) * tf.exp(tf.constant([[-1.0], [1.0]]) * t[1]))
    # The fallback is candidate number `attempts`, always acceptable: argmax finds the first valid one.
    hw = tf.where(tf.constant([[False] * attempts + [True]]), fallback, hw)
    ok = tf.reduce_all((hw >= 1.0) & (hw <= limit), axis=0)
    first = tf.argmax(tf.cast(ok, tf.float32), output_type=tf.int32)
    crop = tf.gather(hw, first, axis=1)
    offset_u = tf.where(first < attempts, t[:, attempts], centre_u)
    # floor(u * (room + 1)) is uniform on 0..room; u <= 1 - 2**-23, so it never reaches room + 1.
    sides_plus_one = tf.constant([hf + 1, wf + 1]) if static else tf.stack([hf, wf]) + 1.0
    offset = tf.floor(offset_u * (sides_plus_one - crop))
    return offset, crop


def torchvision_crop_box(height, width, seed: tf.Tensor, scale, ratio=(3 / 4, 4 / 3), attempts: int = 10) -> tf.Tensor:
    """int32 [top, left, h, w] drawn by torchvision's ``RandomResizedCrop.get_params``.

    Reference: pytorch/vision ``torchvision/transforms/transforms.py``,
    ``RandomResizedCrop.get_params``: up to 10 attempts of
    ``target_area = H*W * U(scale)``, ``aspect = exp(U(log r0, log r1))``,
    ``w = round(sqrt(target_area * aspect))``, ``h = round(sqrt(target_area / aspect))``; the first
    attempt with ``0 < w <= W and 0 < h <= H`` is taken, its offsets uniform integers in
    ``[0, H - h]`` x ``[0, W - w]``. When none fits: a centre crop of the whole image, narrowed to
    the nearest aspect ratio in ``ratio``. The attempts are drawn all at once (vectorised, one
    stateless draw) and the first valid one is taken, which has the same distribution as the
    sequential loop. ``round`` is round-half-to-even in both Python and ``tf.round``; offsets are
    ``floor(U * (H - h + 1))``. ``height``/``width``: Python ints (static shape: fewer ops) or
    scalar tensors.
    """
    offset, crop = _crop_box(height, width, seed, scale, ratio, attempts)
    return tf.cast(tf.concat([offset, crop], axis=0), tf.int32)


def resize_bicubic(image: tf.Tensor, size: int, antialias: bool = True, max_hw=None) -> tf.Tensor:
    """Bicubic resize to size x size, clipped to [0, 1].

    ``antialias=True`` (default) approximates PIL's ``Image.resize(..., Image.BICUBIC)``, which
    torchvision's ``F.resized_crop`` calls on the PIL images of the DINO and MAE reference code:
    both use the Keys cubic with a = -0.5, widen the kernel by the shrink factor when
    downscaling (antialiasing) and renormalise the weights at the border
    (``tf.image.resize(..., antialias=True)`` runs ``ScaleAndTranslate``). What still differs:
    PIL works on uint8 images with fixed-point weights and rounds and clips to uint8 after the
    horizontal and again after the vertical pass; here everything is float32 and clipped once.
    On the same uint8 image the two agree to within 1.5 grey levels (mean 0.3) wherever PIL's
    clip between its passes does not act (tests/test_augment_reference.py); next to saturated,
    high-contrast edges that clip can move single pixels by more. ``antialias=False`` is
    ssl_ad's earlier resize (``ResizeBicubic``: no kernel widening, so shrinking aliases).
    Cost: ``ScaleAndTranslate`` takes about 4x the CPU time of ``ResizeBicubic`` (see
    benchmarks/augment_throughput.py), so it runs only when the input is larger than ``size``
    in some direction.
    ``max_hw``: static upper bounds of the input's height and width (e.g. of a crop's source
    image); when neither exceeds ``size`` no shrinking is possible and the cheaper plain kernel
    is used without a runtime branch.
    """
    def plain():
        return tf.image.resize(image, [size, size], method="bicubic")

    height, width = max_hw or (image.shape[0], image.shape[1])  # static upper bounds, if known
    can_shrink = height is None or width is None or height > size or width > size
    if antialias and can_shrink:
        # Enlarging in both directions the antialiased kernel is the plain one (only the border
        # handling differs) and both agree with PIL equally well (tested); ResizeBicubic is cheaper.
        shape = tf.shape(image)
        shrinks = (shape[0] > size) | (shape[1] > size)
        out = tf.cond(
            shrinks, lambda: tf.image.resize(image, [size, size], method="bicubic", antialias=True), plain
        )
    else:
        out = plain()
    return tf.clip_by_value(out, 0.0, 1.0)


def random_resized_crop(
    image: tf.Tensor,
    seed: tf.Tensor,
    size: int,
    scale: tuple[float, float],
    ratio=(3 / 4, 4 / 3),
    sampler: str = "torchvision",
    antialias: bool = True,
) -> tf.Tensor:
    """A crop covering ``scale`` of the area with aspect ratio in ``ratio``, resized to size x size.

    ``sampler='torchvision'`` (default): :func:`torchvision_crop_box`, torchvision's
    ``RandomResizedCrop.get_params`` (area uniform in ``scale``, log-uniform aspect ratio).
    ``sampler='tf_bounding_box'``: ssl_ad's earlier ``tf.image.stateless_sample_distorted_bounding_box``
    (aspect ratio uniform, not log-uniform; 10 attempts, whole image as fallback); its crops are
    a little smaller on average (mean area 0.620 vs 0.641 of a square image for scale (0.4, 1)).
    The resize is :func:`resize_bicubic` (``antialias``).
    """
    if _choice(sampler, CROP_SAMPLERS, "crop_sampler") == "torchvision":
        height, width = image.shape[0], image.shape[1]
        if height is None or width is None:
            height, width = tf.shape(image)[0], tf.shape(image)[1]
        offset, crop_hw = _crop_box(height, width, seed, scale, ratio)
        begin = tf.concat([tf.cast(offset, tf.int32), [0]], axis=0)
        crop = tf.slice(image, begin, tf.concat([tf.cast(crop_hw, tf.int32), [-1]], axis=0))
    else:
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
    out = resize_bicubic(crop, size, antialias, max_hw=(image.shape[0], image.shape[1]))
    return tf.ensure_shape(out, [size, size, image.shape[-1]])  # tf.slice loses the static channel count


def maybe_flip(image: tf.Tensor, seed: tf.Tensor, enabled: bool) -> tf.Tensor:
    return tf.image.stateless_random_flip_left_right(image, seed) if enabled else image


def _coin(seed: tf.Tensor, p: float) -> tf.Tensor:
    return tf.random.stateless_uniform([], seed) < p


def _grayscale(image: tf.Tensor) -> tf.Tensor:
    """(H, W, 1) luma with torchvision's weights (``_functional_tensor.rgb_to_grayscale``).

    A matmul: several times faster than a multiply and a sum over the 3-wide last axis.
    """
    return tf.matmul(image, tf.constant([[w] for w in GRAY_WEIGHTS], image.dtype))


def adjust_brightness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """torchvision ``adjust_brightness``: blend with black, ``clamp(image * factor, 0, 1)``.

    ``image`` and ``factor`` are non-negative, so only the upper clamp can act.
    """
    return tf.minimum(image * factor, 1.0)


def adjust_contrast(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """torchvision ``adjust_contrast``: ``_blend`` with the mean of the whole grayscale image.

    ``_blend(img1, img2, ratio) = (ratio * img1 + (1 - ratio) * img2).clamp(0, 1)``; the mean of
    the grayscale image is the grayscale of the mean colour (both are linear).
    """
    mean = tf.reduce_sum(tf.reduce_mean(image, axis=[0, 1]) * tf.constant(GRAY_WEIGHTS, image.dtype))
    return tf.clip_by_value(image * factor + (1.0 - factor) * mean, 0.0, 1.0)


def adjust_saturation(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """torchvision ``adjust_saturation``: ``_blend`` with the grayscale image, clamped to [0, 1]."""
    return tf.clip_by_value(image * factor + (1.0 - factor) * _grayscale(image), 0.0, 1.0)


def adjust_hue(image: tf.Tensor, delta: tf.Tensor) -> tf.Tensor:
    """torchvision ``adjust_hue``: H += delta (mod 1) in HSV (TF's fused kernel).

    Like torchvision's tensor version, no clamp: HSV -> RGB stays in [0, 1] (to float rounding).
    """
    return tf.image.adjust_hue(image, delta)


def _additive_color_jitter(image: tf.Tensor, seed: tf.Tensor, p: float, strength) -> tf.Tensor:
    """ssl_ad's earlier jitter (``color_jitter_impl='additive_brightness'``), kept bit for bit.

    Brightness adds U[-b, b]; contrast (``tf.image``: per-channel mean), saturation (``tf.image``:
    S scaled in HSV) and hue in this fixed order; one clip to [0, 1] at the end.
    """
    s = split_seed(seed, 5)
    b, c, sat, h = strength

    def jitter(x):
        x = tf.image.stateless_random_brightness(x, b, s[1])
        x = tf.image.stateless_random_contrast(x, 1 - c, 1 + c, s[2])
        x = tf.image.stateless_random_saturation(x, 1 - sat, 1 + sat, s[3])
        x = tf.image.stateless_random_hue(x, h, s[4])
        return tf.clip_by_value(x, 0.0, 1.0)

    return tf.cond(_coin(s[0], p), lambda: jitter(image), lambda: image)


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


# All 24 orders of the four operations: one uniform picks a row (uniformly), as torch.randperm(4).
_ORDERS = tuple(itertools.permutations(range(4)))


def _jitter_params(u: tf.Tensor, strength) -> tuple[tf.Tensor, tf.Tensor]:
    """(order, factors) from 5 uniforms: 4 for the factors, 1 picking one of the 24 orders."""
    b, c, sat, h = (float(v) for v in strength)
    if min(b, c, sat, h) < 0 or h > 0.5:
        raise UserInputError(f"data.color_jitter {tuple(strength)}: need values >= 0 and hue <= 0.5")
    low = tf.constant([max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - sat), -h], tf.float32)
    high = tf.constant([1 + b, 1 + c, 1 + sat, h], tf.float32)
    order = tf.gather(tf.constant(_ORDERS, tf.int32), tf.cast(u[4] * len(_ORDERS), tf.int32))
    return order, low + (high - low) * u[:4]


def color_jitter_params(seed: tf.Tensor, strength) -> tuple[tf.Tensor, tf.Tensor]:
    """torchvision ``ColorJitter.get_params``: (order, factors) for one image.

    ``order`` (int32 [4]) is a uniformly random permutation of (0 brightness, 1 contrast,
    2 saturation, 3 hue), as ``torch.randperm(4)`` (here: one of the 24 picked by one uniform);
    ``factors`` (float32 [4]) are uniform in [max(0, 1-b), 1+b], [max(0, 1-c), 1+c],
    [max(0, 1-s), 1+s], [-h, h].
    """
    return _jitter_params(tf.random.stateless_uniform([5], seed), strength)


def apply_color_jitter(image: tf.Tensor, order: tf.Tensor, factors: tf.Tensor, strength) -> tf.Tensor:
    """torchvision ``ColorJitter.forward``: the four adjustments in ``order``, each within [0, 1].

    An operation whose strength is 0 is skipped (torchvision sets its range to None). Each of
    the four steps is a ``tf.switch_case`` on ``order[step]`` (unrolled: in tf.data a
    ``tf.while_loop`` costs more per image than the extra tracing).
    """
    branches = [
        (lambda x, k: x) if not float(v) else (lambda x, k, fn=fn: fn(x, factors[k]))
        for fn, v in zip(_JITTER_OPS, strength)
    ]
    x = image
    for step in range(4):
        x = tf.switch_case(order[step], [lambda fn=fn, k=k, x=x: fn(x, k) for k, fn in enumerate(branches)])
    return tf.ensure_shape(x, image.shape)


def color_jitter(
    image: tf.Tensor,
    seed: tf.Tensor,
    p: float,
    strength: tuple[float, float, float, float],
    impl: str = "torchvision",
) -> tf.Tensor:
    """With probability p, colour jitter of strength (brightness, contrast, saturation, hue).

    DINO: ``RandomApply([ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8)``.
    ``impl='torchvision'`` (default) follows pytorch/vision ``torchvision/transforms/transforms.py``
    ``ColorJitter.get_params`` / ``forward`` and ``torchvision/transforms/_functional_tensor.py``
    ``adjust_brightness/contrast/saturation/hue``: factors b ~ U[max(0, 1-b), 1+b] (multiplied),
    c ~ U[max(0, 1-c), 1+c] (blend with the grayscale image's mean), s ~ U[max(0, 1-s), 1+s]
    (blend with the grayscale image), h ~ U[-h, h] (hue shift), applied in a random order per image
    (``torch.randperm(4)``: here one of the 24 orders drawn uniformly), each blend clamped to [0, 1]
    (``_blend``) before the next operation; a zero strength skips that operation, as torchvision
    does. The DINO code jitters PIL uint8 images (rounding after every operation, and PIL's
    contrast rounds the mean to an integer); this works in float32. All random numbers come from
    one stateless draw from ``seed``. ``impl='additive_brightness'``: ssl_ad's earlier jitter
    (:func:`_additive_color_jitter`), unchanged.
    """
    if _choice(impl, COLOR_JITTER_IMPLS, "color_jitter_impl") == "additive_brightness":
        return _additive_color_jitter(image, seed, p, strength)
    if p <= 0.0 or not any(float(v) for v in strength):
        return image
    u = tf.random.stateless_uniform([6], seed)  # one draw: the coin, then as color_jitter_params

    def jitter():
        order, factors = _jitter_params(u[1:], strength)
        return apply_color_jitter(image, order, factors, strength)

    return tf.cond(u[0] < p, jitter, lambda: image)


def random_grayscale(image: tf.Tensor, seed: tf.Tensor, p: float) -> tf.Tensor:
    grey = tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(image))
    return tf.cond(_coin(seed, p), lambda: grey, lambda: image)


def gaussian_blur(image: tf.Tensor, seed: tf.Tensor, p: float, sigma_range: tuple[float, float]) -> tf.Tensor:
    """With probability p, a separable Gaussian blur with sigma ~ U(sigma_range) pixels."""
    if p <= 0.0:
        return image
    s = split_seed(seed, 2)
    sigma = tf.random.stateless_uniform([], s[1], sigma_range[0], sigma_range[1])
    radius = math.ceil(3 * sigma_range[1])
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


def _crop_options(aug: Any) -> dict[str, Any]:
    """``data.crop_sampler`` and ``data.resize_antialias`` (reference defaults when absent)."""
    return {"sampler": aug.get("crop_sampler", "torchvision"), "antialias": bool(aug.get("resize_antialias", True))}


def dino_view(image: tf.Tensor, seed: tf.Tensor, size: int, scale, blur_p: float, solar_p: float, aug: Any) -> tf.Tensor:
    """One DINO view: crop, flip, colour jitter, grayscale, blur, solarisation (normalised later)."""
    s = split_seed(seed, 6)
    x = random_resized_crop(image, s[0], size, scale, **_crop_options(aug))
    x = maybe_flip(x, s[1], aug.hflip)
    x = color_jitter(
        x, s[2], aug.color_jitter_p, tuple(aug.color_jitter), impl=aug.get("color_jitter_impl", "torchvision")
    )
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
    x = random_resized_crop(image, s[0], aug.image_size, tuple(aug.crop_scale), **_crop_options(aug))
    x = maybe_flip(x, s[1], aug.hflip)
    return {"image": normalize(x, aug.mean, aug.std)}


RECIPES = {"single": single_view, "multicrop": multicrop}
