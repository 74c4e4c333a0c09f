"""DINO's multi-crop and MAE's crop/flip recipes as one jitted JAX function on the device.

With ``data.augment_device=True`` the host pipeline (:mod:`ssl_ad.data.pipeline`) only gathers
the uint8 images of a step; :func:`batch_augmenter` turns them into the batch the tf.data recipe
would have produced (same keys, shapes and dtypes; the same distributions, not the same random
numbers), on the accelerator, so the host's cores stop being the limit (benchmarks/README.md,
"Can the input pipeline feed an H200?").

Every random choice of sample ``i`` at step ``s`` comes from ``fold_in(fold_in(fold_in(key(seed),
s), AUGMENT_STREAM), i)``: ``fold_in(key(seed), s)`` is the train step's rng
(:func:`ssl_ad.train.step.make_train_step`), :data:`AUGMENT_STREAM` keeps the augmentation's
numbers apart from the step's own (drop path, masking), and ``i`` is the sample's index in the
global batch, so the crops are a pure function of (seed, step, position): deterministic and
resumable, whatever the number of devices or hosts.

The recipe mirrors :mod:`ssl_ad.data.augment` (facebookresearch/dino ``main_dino.py``
``DataAugmentationDINO``; facebookresearch/mae ``main_pretrain.py``; torchvision
``RandomResizedCrop`` and ``ColorJitter``) op for op:

* crop box: torchvision ``RandomResizedCrop.get_params`` (10 vectorised attempts, centre-crop
  fallback), exactly as :func:`ssl_ad.data.augment.torchvision_crop_box`;
* crop + resize + flip: one pair of dense resampling matrices per view (rows: output pixels,
  columns: source pixels), ``out = Wy @ image @ Wx^T``, with TensorFlow's bicubic weights (Keys
  cubic, a = -0.5, half-pixel centres, taps outside the crop dropped and the rest renormalised,
  the kernel widened by the shrink factor when ``resize_antialias``: ``tf.image.resize(...,
  antialias=True)``'s ``ScaleAndTranslate``); a flip reverses the rows of ``Wx``. The two
  products run at JAX's default matmul precision: float32 on CPU, TF32 tensor cores on recent
  NVIDIA GPUs (relative error about 5e-4, 0.1 grey level: below the uint8 rounding of the
  reference's PIL resize; ``Precision.HIGHEST`` would run them on the GPU's slower float32 units);
* colour jitter (torchvision order semantics, as :func:`ssl_ad.data.augment.color_jitter`),
  grayscale, Gaussian blur (zero-padded ``SAME`` separable convolution: 2 x (2r + 1) shifted
  adds), solarisation, normalisation, all elementwise in float32.

Only ``data.crop_sampler='torchvision'`` and ``data.color_jitter_impl='torchvision'`` (the
defaults) exist here (the config check refuses the others with ``augment_device``).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ssl_ad.data.augment import GRAY_WEIGHTS
from ssl_ad.errors import UserInputError

AUGMENT_STREAM = 0x417567  # fold_in tag of the augmentation's keys ('Aug')
# All 24 orders of (0 brightness, 1 contrast, 2 saturation, 3 hue): one uniform picks a row, as
# torch.randperm(4) (the same table as ssl_ad.data.augment).
ORDERS = np.array(list(itertools.permutations(range(4))), np.int32)


@dataclasses.dataclass(frozen=True)
class DeviceRecipe:
    """What the device recipe reads from ``config.data`` / ``config.model`` (static under jit)."""

    recipe: str  # 'multicrop' (DINO) | 'single' (MAE)
    image_size: int
    crop_scale: tuple[float, float]
    hflip: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]
    antialias: bool
    global_size: int = 224
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_size: int = 96
    local_scale: tuple[float, float] = (0.05, 0.4)
    num_local: int = 8
    global_blur: tuple[float, float] = (1.0, 0.1)
    local_blur: float = 0.5
    solarize_p: float = 0.2
    color_jitter_p: float = 0.8
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    grayscale_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 2.0)

    @classmethod
    def from_config(cls, config: Any) -> "DeviceRecipe":
        """Raises UserInputError for a recipe or option the device path does not have."""
        data = config.data
        recipe = data.get("augment", "single")
        if recipe not in ("single", "multicrop"):
            raise UserInputError(f"unknown data.augment {recipe!r}; choose from ['multicrop', 'single']")
        for key in ("crop_sampler", "color_jitter_impl"):
            if data.get(key, "torchvision") != "torchvision":
                raise UserInputError(f"data.augment_device=True needs data.{key}='torchvision', not {data.get(key)!r}")
        fields = {f.name for f in dataclasses.fields(cls)} - {"recipe", "image_size", "antialias"}
        values = {k: (tuple(data[k]) if isinstance(data[k], (tuple, list)) else data[k]) for k in fields if k in data}
        values.setdefault("global_size", int(config.model.image_size))
        return cls(recipe=recipe, image_size=int(config.model.image_size),
                   antialias=bool(data.get("resize_antialias", True)), **values)


# ------------------------------------------------------------------------------------------------
# Crop box and resampling matrices
# ------------------------------------------------------------------------------------------------


def _fallback_hw(height: int, width: int, ratio: tuple[float, float]) -> tuple[float, float]:
    """torchvision's fallback (h, w): the whole image narrowed to the nearest ratio in ``ratio``."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        return float(round(width / min(ratio))), float(width)
    if in_ratio > max(ratio):
        return float(height), float(round(height * max(ratio)))
    return float(height), float(width)


def crop_box(key: jax.Array, height: int, width: int, scale: tuple[float, float],
             ratio: tuple[float, float] = (3 / 4, 4 / 3), attempts: int = 10) -> jax.Array:
    """float32 [top, left, h, w] (whole pixels) drawn as torchvision's ``RandomResizedCrop.get_params``.

    Source: pytorch/vision ``torchvision/transforms/transforms.py``: up to ``attempts`` tries of
    area = H*W*U(scale), aspect = exp(U(log r0, log r1)), w = round(sqrt(area*aspect)),
    h = round(sqrt(area/aspect)); the first with 0 < h <= H and 0 < w <= W is taken, offsets
    uniform integers in [0, H-h] x [0, W-w]; none fits: centre crop of the whole image narrowed
    to ``ratio``. Vectorised like :func:`ssl_ad.data.augment.torchvision_crop_box` (same rule,
    round half to even, offsets floor(U * (room + 1))). ``height``/``width``: static ints.
    """
    fb_h, fb_w = _fallback_hw(height, width, ratio)
    limit = jnp.array([[height], [width]], jnp.float32)
    centre_u = jnp.array([(room // 2 + 0.5) / (room + 1) for room in (height - fb_h, width - fb_w)], jnp.float32)
    half_log = (math.log(ratio[0]) / 2, math.log(ratio[1]) / 2)
    low = jnp.array([[scale[0]] * attempts + [0.0], [half_log[0]] * attempts + [0.0]], jnp.float32)
    high = jnp.array([[scale[1]] * attempts + [1.0], [half_log[1]] * attempts + [1.0]], jnp.float32)
    t = low + (high - low) * jax.random.uniform(key, (2, attempts + 1), jnp.float32)
    hw = jnp.round(math.sqrt(height * width) * jnp.sqrt(t[0]) * jnp.exp(jnp.array([[-1.0], [1.0]]) * t[1]))
    hw = hw.at[:, attempts].set(jnp.array([fb_h, fb_w], jnp.float32))
    ok = jnp.all((hw >= 1.0) & (hw <= limit), axis=0)
    first = jnp.argmax(ok)  # the fallback (last column) is always valid
    crop = hw[:, first]
    offset_u = jnp.where(first < attempts, t[:, attempts], centre_u)
    offset = jnp.floor(offset_u * (jnp.array([height, width], jnp.float32) + 1.0 - crop))
    return jnp.concatenate([offset, crop])


def _keys_cubic(x: jax.Array) -> jax.Array:
    """Keys' cubic convolution kernel with a = -0.5 (TensorFlow's and PIL's bicubic)."""
    a = -0.5
    x = jnp.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return jnp.where(x < 1.0, near, jnp.where(x < 2.0, far, 0.0))


def resize_matrix(start: jax.Array, length: jax.Array, in_size: int, out_size: int, antialias: bool) -> jax.Array:
    """(out_size, in_size) float32 weights resampling source pixels [start, start + length) to out_size.

    TensorFlow's ``ScaleAndTranslate`` (``tf.image.resize(crop, ..., 'bicubic', antialias=True)``)
    on the crop: output pixel x samples the crop at (x + 0.5) * length / out_size; source pixel j
    of the crop weighs cubic((j + 0.5 - sample) / k) with k = max(length / out_size, 1) when
    ``antialias`` (else 1: ``ResizeBicubic`` with half-pixel centres, whose taps outside the image
    are dropped and the rest renormalised the same way); pixels outside the crop weigh 0; each row
    is normalised to sum 1.
    """
    scale = length / out_size
    kernel_scale = jnp.maximum(scale, 1.0) if antialias else 1.0
    sample = (jnp.arange(out_size, dtype=jnp.float32)[:, None] + 0.5) * scale
    j = jnp.arange(in_size, dtype=jnp.float32)[None, :] - start
    w = _keys_cubic((j + 0.5 - sample) / kernel_scale) * ((j >= 0) & (j < length))
    total = jnp.sum(w, axis=1, keepdims=True)
    return w / jnp.where(jnp.abs(total) > 0, total, 1.0)


def resized_crop(image: jax.Array, box: jax.Array, size: int, antialias: bool = True,
                 flip: jax.Array | bool = False) -> jax.Array:
    """(H, W, C) float32 in [0, 1], box [top, left, h, w] -> (size, size, C), clipped to [0, 1].

    The crop resized as ``tf.image.resize(crop, [size, size], 'bicubic', antialias)`` does it
    (:func:`resize_matrix`), then mirrored left-right when ``flip`` (a reversal of ``Wx``'s rows).
    """
    height, width = image.shape[0], image.shape[1]
    wy = resize_matrix(box[0], box[2], height, size, antialias)
    wx = resize_matrix(box[1], box[3], width, size, antialias)
    wx = jnp.where(flip, wx[::-1], wx)
    out = jnp.einsum("yh,hwc->ywc", wy, image)  # default precision (see the module docstring)
    out = jnp.einsum("xw,ywc->yxc", wx, out)
    return jnp.clip(out, 0.0, 1.0)


# ------------------------------------------------------------------------------------------------
# Colour
# ------------------------------------------------------------------------------------------------


def grayscale(image: jax.Array) -> jax.Array:
    """(H, W, 3) -> (H, W, 1) luma with torchvision's (ITU-R 601-2) weights (elementwise, exact float32)."""
    r, g, b = GRAY_WEIGHTS
    return (r * image[..., 0] + g * image[..., 1] + b * image[..., 2])[..., None]


def adjust_brightness(image: jax.Array, factor: jax.Array) -> jax.Array:
    """torchvision ``adjust_brightness`` on [0, 1] images: ``min(image * factor, 1)``."""
    return jnp.minimum(image * factor, 1.0)


def adjust_contrast(image: jax.Array, factor: jax.Array) -> jax.Array:
    """torchvision ``adjust_contrast``: blend with the grayscale image's mean, clamped to [0, 1]."""
    mean = jnp.mean(grayscale(image))
    return jnp.clip(image * factor + (1.0 - factor) * mean, 0.0, 1.0)


def adjust_saturation(image: jax.Array, factor: jax.Array) -> jax.Array:
    """torchvision ``adjust_saturation``: blend with the grayscale image, clamped to [0, 1]."""
    return jnp.clip(image * factor + (1.0 - factor) * grayscale(image), 0.0, 1.0)


def adjust_hue(image: jax.Array, delta: jax.Array) -> jax.Array:
    """torchvision ``adjust_hue`` (``tf.image.adjust_hue``): H += delta (mod 1) in HSV; (H, W, 3)."""
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    v = jnp.maximum(jnp.maximum(r, g), b)
    chroma = v - jnp.minimum(jnp.minimum(r, g), b)
    safe = jnp.where(chroma > 0, chroma, 1.0)
    h = jnp.where(v == r, (g - b) / safe, jnp.where(v == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    h = jnp.where(chroma > 0, h / 6.0, 0.0)
    h = jnp.mod(h + delta, 1.0) * 6.0
    # HSV -> RGB: each channel n in (5, 3, 1) is v - chroma * clip(min(k, 4 - k), 0, 1), k = (n + h) mod 6.
    k = jnp.mod(jnp.array([5.0, 3.0, 1.0]) + h[..., None], 6.0)
    return v[..., None] - chroma[..., None] * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def jitter_params(u: jax.Array, strength: tuple[float, float, float, float]) -> tuple[jax.Array, jax.Array]:
    """(order int32 [4], factors float32 [4]) from 5 uniforms, as ``ColorJitter.get_params``.

    Factors uniform in [max(0, 1-b), 1+b], [max(0, 1-c), 1+c], [max(0, 1-s), 1+s], [-h, h];
    the order one of the 24 permutations, picked uniformly by ``u[4]``. Raises UserInputError
    for a negative strength or hue > 0.5.
    """
    b, c, s, h = (float(v) for v in strength)
    if min(b, c, s, h) < 0 or h > 0.5:
        raise UserInputError(f"data.color_jitter {tuple(strength)}: need values >= 0 and hue <= 0.5")
    low = jnp.array([max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h], jnp.float32)
    high = jnp.array([1 + b, 1 + c, 1 + s, h], jnp.float32)
    order = jnp.asarray(ORDERS)[jnp.minimum((u[4] * len(ORDERS)).astype(jnp.int32), len(ORDERS) - 1)]
    return order, low + (high - low) * u[:4]


def apply_color_jitter(image: jax.Array, order: jax.Array, factors: jax.Array,
                       strength: tuple[float, float, float, float]) -> jax.Array:
    """torchvision ``ColorJitter.forward``: the four adjustments in ``order``, each clamped to [0, 1].

    An operation of strength 0 is skipped (torchvision sets its range to None). Under ``vmap``
    every branch of the ``lax.switch`` is computed and one selected.
    """
    branches = [
        (lambda x, f: x) if not float(v) else fn for fn, v in zip(_JITTER_OPS, strength)
    ]
    x = image
    for step in range(4):
        k = order[step]
        x = jax.lax.switch(k, [lambda y, i=i, fn=fn: fn(y, factors[i]) for i, fn in enumerate(branches)], x)
    return x


def color_jitter(image: jax.Array, key: jax.Array, p: float, strength: tuple[float, float, float, float]) -> jax.Array:
    """With probability ``p``, :func:`apply_color_jitter` with :func:`jitter_params` (one draw of 6 uniforms).

    DINO: ``RandomApply([ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8)``.
    """
    if p <= 0.0 or not any(float(v) for v in strength):
        return image
    u = jax.random.uniform(key, (6,), jnp.float32)
    order, factors = jitter_params(u[1:], strength)
    return jnp.where(u[0] < p, apply_color_jitter(image, order, factors, strength), image)


# ------------------------------------------------------------------------------------------------
# Blur, solarisation, normalisation
# ------------------------------------------------------------------------------------------------


def blur(image: jax.Array, sigma: jax.Array, sigma_max: float) -> jax.Array:
    """(S, S, C) blurred by a normalised Gaussian of ``sigma`` pixels, separable, zero-padded ``SAME``.

    The kernel has r = ceil(3 * sigma_max) taps each side, weights exp(-x^2 / (2 sigma^2)) / sum,
    rows first, then columns, as :func:`ssl_ad.data.augment.gaussian_blur`
    (``tf.nn.depthwise_conv2d``, padding 'SAME'); here 2r + 1 shifted, weighted adds per axis.
    """
    radius = math.ceil(3 * sigma_max)
    taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    kernel = jnp.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / jnp.sum(kernel)

    def along(x: jax.Array, axis: int) -> jax.Array:
        n = x.shape[axis]
        pad = [(0, 0)] * x.ndim
        pad[axis] = (radius, radius)
        padded = jnp.pad(x, pad)
        return sum(kernel[t] * jax.lax.slice_in_dim(padded, t, t + n, axis=axis) for t in range(2 * radius + 1))

    return along(along(image, 0), 1)


def gaussian_blur(image: jax.Array, key: jax.Array, p: jax.Array | float, sigma_range: tuple[float, float],
                  max_p: float) -> jax.Array:
    """With probability ``p``, :func:`blur` with sigma ~ U(sigma_range) pixels; (S, S, C).

    DINO's ``GaussianBlur(p, radius_min=0.1, radius_max=2.)``. ``max_p``: a static bound of ``p``
    (0 skips the blur without computing it).
    """
    if max_p <= 0.0:
        return image
    coin_key, sigma_key = jax.random.split(key)
    sigma = jax.random.uniform(sigma_key, (), jnp.float32, sigma_range[0], sigma_range[1])
    return jnp.where(jax.random.uniform(coin_key, ()) < p, blur(image, sigma, sigma_range[1]), image)


def solarize(image: jax.Array, key: jax.Array, p: jax.Array | float, max_p: float) -> jax.Array:
    """With probability ``p``: pixels >= 0.5 become 1 - x (PIL ``ImageOps.solarize(img, 128)``)."""
    if max_p <= 0.0:
        return image
    return jnp.where(jax.random.uniform(key, ()) < p, jnp.where(image < 0.5, image, 1.0 - image), image)


def normalize(image: jax.Array, mean, std) -> jax.Array:
    return (image - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def _coin(key: jax.Array, p: float) -> jax.Array:
    return jax.random.uniform(key, ()) < p


# ------------------------------------------------------------------------------------------------
# Views and recipes
# ------------------------------------------------------------------------------------------------


def dino_view(image: jax.Array, key: jax.Array, size: int, scale: tuple[float, float], blur_p, solar_p,
              r: DeviceRecipe, max_blur_p: float, max_solar_p: float) -> jax.Array:
    """One DINO view of (H, W, 3) float32 [0, 1]: crop, flip, jitter, grayscale, blur, solarise -> (size, size, 3).

    ``blur_p`` / ``solar_p`` may be traced (one ``vmap`` over the two global views); the
    ``max_*`` are their static bounds. Not normalised (the caller does it).
    """
    k = jax.random.split(key, 6)
    box = crop_box(k[0], image.shape[0], image.shape[1], scale)
    flip = _coin(k[1], 0.5) if r.hflip else False
    x = resized_crop(image, box, size, r.antialias, flip)
    x = color_jitter(x, k[2], r.color_jitter_p, r.color_jitter)
    if r.grayscale_p > 0:
        x = jnp.where(_coin(k[3], r.grayscale_p), jnp.broadcast_to(grayscale(x), x.shape), x)
    x = gaussian_blur(x, k[4], blur_p, r.blur_sigma, max_blur_p)
    return solarize(x, k[5], solar_p, max_solar_p)


def multicrop(image: jax.Array, key: jax.Array, r: DeviceRecipe) -> dict[str, jax.Array]:
    """DINO's multi-crop of one image: {'global': (2, G, G, 3), 'local': (L, l, l, 3)} normalised float32.

    Global view 1: blur p = global_blur[0], no solarisation; view 2: blur p = global_blur[1],
    solarisation p = solarize_p; locals: blur p = local_blur (``DataAugmentationDINO``).
    """
    keys = jax.random.split(key, 2 + max(r.num_local, 1))
    blur = jnp.asarray(r.global_blur, jnp.float32)
    solar = jnp.asarray([0.0, r.solarize_p], jnp.float32)
    glob = jax.vmap(lambda k, bp, sp: dino_view(image, k, r.global_size, r.global_scale, bp, sp, r,
                                                max(r.global_blur), r.solarize_p))(keys[:2], blur, solar)
    out = {"global": normalize(glob, r.mean, r.std)}
    if r.num_local:
        local = jax.vmap(lambda k: dino_view(image, k, r.local_size, r.local_scale, r.local_blur, 0.0, r,
                                             r.local_blur, 0.0))(keys[2:2 + r.num_local])
        out["local"] = normalize(local, r.mean, r.std)
    return out


def single_view(image: jax.Array, key: jax.Array, r: DeviceRecipe) -> dict[str, jax.Array]:
    """MAE's view of one image: random resized crop (``crop_scale``) and optional flip -> {'image': (S, S, 3)}."""
    k = jax.random.split(key, 2)
    box = crop_box(k[0], image.shape[0], image.shape[1], r.crop_scale)
    flip = _coin(k[1], 0.5) if r.hflip else False
    return {"image": normalize(resized_crop(image, box, r.image_size, r.antialias, flip), r.mean, r.std)}


def to_float_rgb(images: jax.Array) -> jax.Array:
    """uint8 (..., H, W, 1|3|4) -> float32 RGB in [0, 1]: grey repeated, alpha dropped."""
    x = images.astype(jnp.float32) / 255.0
    if x.shape[-1] == 1:
        return jnp.repeat(x, 3, axis=-1)
    return x[..., :3]


def sample_keys(seed: int, step: jax.Array, batch: int) -> jax.Array:
    """(batch,) keys: ``fold_in(fold_in(fold_in(key(seed), step), AUGMENT_STREAM), i)`` for i < batch."""
    base = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), AUGMENT_STREAM)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(batch, dtype=jnp.uint32))


def batch_augmenter(config: Any) -> Callable[[dict, jax.Array], dict]:
    """``augment(batch, step) -> batch`` (pure, jittable) for ``config``'s recipe.

    ``batch['image']``: uint8 (B, H, W, C) (the host pipeline with ``data.augment_device``);
    ``step``: int scalar, the completed-update count the train step will use. Returns what the
    tf.data recipe gives: multi-crop ``{'global': (B, 2, G, G, 3), 'local': (B, L, l, l, 3)}``,
    single ``{'image': (B, S, S, 3)}``, normalised float32. Raises UserInputError (when built)
    for options the device path lacks.
    """
    recipe = DeviceRecipe.from_config(config)
    view = multicrop if recipe.recipe == "multicrop" else single_view
    seed = int(config.seed)

    def augment(batch: dict, step: jax.Array) -> dict:
        images = to_float_rgb(batch["image"])
        keys = sample_keys(seed, step, images.shape[0])
        return jax.vmap(lambda img, k: view(img, k, recipe))(images, keys)

    return augment


def jitted_augmenter(config: Any) -> Callable[[dict, jax.Array], dict] | None:
    """:func:`batch_augmenter` jitted, or None when ``data.augment_device`` is off (or absent)."""
    if not config.data.get("augment_device", False):
        return None
    return jax.jit(batch_augmenter(config))
