"""ssl_ad's augmentations against the reference code's rules (torchvision as DINO and MAE use it).

Every expectation here is an independent formula (NumPy, colorsys, PIL), written from
pytorch/vision ``torchvision/transforms/transforms.py`` (``RandomResizedCrop.get_params``,
``ColorJitter``) and ``torchvision/transforms/_functional_tensor.py`` (``adjust_*``, ``_blend``,
``rgb_to_grayscale``), not from ssl_ad's code.
"""

import colorsys
import itertools
import math

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from scipy import stats

from ssl_ad.config_defaults import base_config, multicrop_data
from ssl_ad.data import augment
from ssl_ad.data.pipeline import train_batches
from ssl_ad.data.sources import ImageSplit
from ssl_ad.errors import UserInputError

RATIO = (3 / 4, 4 / 3)


# ------------------------------------------------------------------------------------------------
# Random resized crop
# ------------------------------------------------------------------------------------------------


def np_torchvision_box(rng, height, width, scale, ratio=RATIO):
    """torchvision RandomResizedCrop.get_params, transcribed (Python floats, banker's round)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def np_boxes(n, height, width, scale, seed=0):
    rng = np.random.default_rng(seed)
    return np.array([np_torchvision_box(rng, height, width, scale) for _ in range(n)], np.float64)


def tf_boxes(n, height, width, scale, sampler="torchvision"):
    """(top, left, h, w) of n crops drawn by ssl_ad with seeds (7, 0..n-1)."""
    seeds = tf.stack([tf.fill([n], tf.constant(7, tf.int64)), tf.range(n, dtype=tf.int64)], axis=1)

    if sampler == "torchvision":
        def one(seed):
            return augment.torchvision_crop_box(height, width, seed, scale, RATIO)
    else:
        def one(seed):
            begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
                [height, width, 1], tf.zeros([1, 0, 4]), seed=seed, min_object_covered=0.0,
                aspect_ratio_range=RATIO, area_range=scale, max_attempts=10, use_image_if_no_bounding_boxes=True,
            )
            return tf.stack([begin[0], begin[1], size[0], size[1]])

    fn = tf.function(lambda s: tf.map_fn(one, s, fn_output_signature=tf.int32))
    return fn(seeds).numpy().astype(np.float64)


@pytest.fixture(scope="module")
def dino_global_boxes():
    n = 8000
    return tf_boxes(n, 224, 224, (0.4, 1.0)), np_boxes(40000, 224, 224, (0.4, 1.0))


def _z(a, b):
    return abs(a.mean() - b.mean()) / math.sqrt(a.var() / len(a) + b.var() / len(b))


def test_crop_area_and_log_aspect_follow_torchvision(dino_global_boxes):
    """DINO global crops (scale 0.4-1, square image): area fraction and log aspect ratio."""
    ours, ref = dino_global_boxes
    area, ref_area = ours[:, 2] * ours[:, 3] / 224**2, ref[:, 2] * ref[:, 3] / 224**2
    log_ar, ref_log_ar = np.log(ours[:, 3] / ours[:, 2]), np.log(ref[:, 3] / ref[:, 2])
    # Means within 4 standard errors of the reference; the whole distributions agree too.
    assert _z(area, ref_area) < 4 and _z(log_ar, ref_log_ar) < 4
    assert stats.ks_2samp(area, ref_area).pvalue > 1e-3
    assert stats.ks_2samp(log_ar, ref_log_ar).pvalue > 1e-3
    # torchvision's numbers for this case: mean area 0.641 (the 0.7 of U(0.4, 1) less the rejected
    # large off-square boxes), log aspect symmetric about 0 and within log(3/4)..log(4/3).
    assert abs(ref_area.mean() - 0.641) < 0.005 and abs(area.mean() - 0.641) < 0.01
    assert abs(log_ar.mean()) < 0.01 and np.all(np.abs(log_ar) <= math.log(4 / 3) + 0.02)
    # Offsets: uniform over the valid range (crop centre uniform about the image centre).
    centre, ref_centre = (ours[:, 1] + ours[:, 3] / 2) / 224, (ref[:, 1] + ref[:, 3] / 2) / 224
    assert _z(centre, ref_centre) < 4 and np.all(ours[:, :2] >= 0)
    assert np.all(ours[:, 0] + ours[:, 2] <= 224) and np.all(ours[:, 1] + ours[:, 3] <= 224)


def test_old_tf_bounding_box_sampler_gives_smaller_crops(dino_global_boxes):
    """The earlier sampler (uniform aspect ratio) differs measurably: mean area ~0.620, skewed aspect."""
    ours, _ = dino_global_boxes
    old = tf_boxes(8000, 224, 224, (0.4, 1.0), sampler="tf_bounding_box")
    old_area, area = old[:, 2] * old[:, 3] / 224**2, ours[:, 2] * ours[:, 3] / 224**2
    assert abs(old_area.mean() - 0.620) < 0.01
    assert _z(area, old_area) > 5 and area.mean() > old_area.mean()
    assert np.log(old[:, 3] / old[:, 2]).mean() > 0.02  # uniform in ratio: E[log r] > 0


def test_crop_sampler_on_an_elongated_image_matches_reference_fallback_rate():
    """20 x 60 image, scale (0.3, 1): ~43 % of draws fail all 10 attempts; fallback centre crop 20 x round(20*4/3)."""
    ours, ref = tf_boxes(3000, 20, 60, (0.3, 1.0)), np_boxes(20000, 20, 60, (0.3, 1.0))
    fallback = (ours[:, 2] == 20) & (ours[:, 3] == 27) & (ours[:, 1] == (60 - 27) // 2)
    ref_fallback = (ref[:, 2] == 20) & (ref[:, 3] == 27) & (ref[:, 1] == (60 - 27) // 2)
    assert 0.3 < ref_fallback.mean() < 0.6
    assert _z(fallback.astype(float), ref_fallback.astype(float)) < 4
    assert _z(ours[:, 2] * ours[:, 3], ref[:, 2] * ref[:, 3]) < 4


@pytest.mark.parametrize(
    "height,width,box",
    [
        (10, 200, (0, (200 - 13) // 2, 10, 13)),  # too wide: h = H, w = round(H * 4/3)
        (200, 10, ((200 - 13) // 2, 0, 13, 10)),  # too tall: w = W, h = round(W / (3/4))
    ],
)
def test_crop_fallback_is_the_reference_centre_crop(height, width, box):
    """No attempt can fit (target area ~ the whole image, wrong shape): torchvision's fallback."""
    rng = np.random.default_rng(1)
    assert np_torchvision_box(rng, height, width, (0.99, 1.0)) == box
    for s in range(5):
        for h, w in ((height, width), (tf.constant(height), tf.constant(width))):  # static and dynamic shape
            got = augment.torchvision_crop_box(h, w, tf.constant([3, s], tf.int64), (0.99, 1.0), RATIO)
            assert tuple(int(v) for v in got) == box


# ------------------------------------------------------------------------------------------------
# Resize
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("src,dst", [(135, 96), (140, 96), (224, 96), (28, 14), (50, 96), (30, 28)])
def test_antialiased_resize_matches_pil_bicubic(src, dst):
    """Same uint8 image, PIL ``resize(BICUBIC)`` vs ssl_ad: within 1.5 grey levels, mean < 0.4.

    Values stay in 64..191 so PIL's clip to uint8 between its horizontal and vertical passes never
    bites (its two uint8 roundings are the remaining difference). The earlier non-antialiased
    resize aliases when shrinking: off by far more.
    """
    img = np.random.default_rng(src * 1000 + dst).integers(64, 192, (src, src, 3), dtype=np.uint8)
    pil = np.asarray(Image.fromarray(img).resize((dst, dst), Image.BICUBIC), np.float64)
    x = tf.constant(img, tf.float32) / 255.0
    dynamic = tf.function(  # shape unknown when traced: the shrink test happens at run time
        lambda v: augment.resize_bicubic(v, dst, antialias=True), input_signature=[tf.TensorSpec([None, None, 3])]
    )
    for ours in (augment.resize_bicubic(x, dst, antialias=True), dynamic(x)):
        diff = np.abs(ours.numpy() * 255 - pil)
        assert diff.max() <= 1.5 and diff.mean() < 0.4
    if src >= 1.3 * dst:
        old = augment.resize_bicubic(x, dst, antialias=False).numpy() * 255
        assert np.abs(old - pil).max() > 10


def test_resize_keeps_constant_images():
    x = tf.fill([37, 23, 3], 0.6)
    for aa in (True, False):
        np.testing.assert_allclose(augment.resize_bicubic(x, 16, aa).numpy(), 0.6, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Colour jitter
# ------------------------------------------------------------------------------------------------

GRAY = np.array([0.2989, 0.587, 0.114])


def np_jitter(img, order, factors, clamp_each=True):
    """torchvision ColorJitter.forward on a float image (H, W, 3), given order and factors."""
    clamp = (lambda v: np.clip(v, 0, 1)) if clamp_each else (lambda v: v)
    x = img.astype(np.float64)
    for k in order:
        f = float(factors[k])
        if k == 0:
            x = clamp(f * x)
        elif k == 1:
            x = clamp(f * x + (1 - f) * (x @ GRAY).mean())
        elif k == 2:
            x = clamp(f * x + (1 - f) * (x @ GRAY)[..., None])
        else:
            hsv = [colorsys.rgb_to_hsv(*np.clip(p, 0, 1)) for p in x.reshape(-1, 3)]
            x = np.array([colorsys.hsv_to_rgb((h + f) % 1.0, s, v) for h, s, v in hsv]).reshape(x.shape)
    return np.clip(x, 0, 1)


def test_jitter_matches_torchvision_formulas_in_every_order():
    img = np.random.default_rng(0).uniform(size=(6, 5, 3)).astype(np.float32)
    strength = (0.4, 0.4, 0.2, 0.1)
    apply = tf.function(lambda x, o, f: augment.apply_color_jitter(x, o, f, strength))
    for i, order in enumerate(itertools.permutations(range(4))):
        factors = np.array([0.7 + 0.03 * i, 1.35 - 0.02 * i, 0.8 + 0.015 * i, -0.1 + 0.008 * i], np.float32)
        got = apply(tf.constant(img), tf.constant(order, tf.int32), tf.constant(factors)).numpy()
        np.testing.assert_allclose(got, np_jitter(img, order, factors), atol=2e-5)


def test_jitter_clamps_after_each_operation():
    """Brightness x1.4 then contrast x0.6: clamping in between changes the result."""
    img = np.zeros((4, 4, 3), np.float32)
    img[:2] = 0.9
    img[2:] = 0.1
    order, factors = (0, 1, 2, 3), np.array([1.4, 0.6, 1.0, 0.0], np.float32)
    got = augment.apply_color_jitter(tf.constant(img), tf.constant(order), tf.constant(factors), (0.4, 0.4, 0, 0))
    each, once = np_jitter(img, order, factors), np_jitter(img, order, factors, clamp_each=False)
    np.testing.assert_allclose(got.numpy(), each, atol=1e-6)
    assert np.abs(each - once).max() > 0.05


def _jitter_many(image, strength, impl, n=300):
    fn = tf.function(
        lambda s: tf.map_fn(
            lambda sd: augment.color_jitter(tf.constant(image), sd, 1.0, strength, impl), s, fn_output_signature=tf.float32
        )
    )
    seeds = tf.stack([tf.fill([n], tf.constant(11, tf.int64)), tf.range(n, dtype=tf.int64)], axis=1)
    return fn(seeds).numpy()


def test_brightness_is_multiplicative_and_additive_mode_still_adds():
    colour = np.array([0.45, 0.5, 0.6], np.float32)  # +-0.4 never leaves [0, 1]
    image = np.broadcast_to(colour, (4, 4, 3)).copy()
    out = _jitter_many(image, (0.4, 0.0, 0.0, 0.0), "torchvision")
    factor = out / colour  # one factor per image, the same for every pixel and channel
    assert np.ptp(factor.reshape(len(out), -1), axis=1).max() < 1e-5
    f = factor[:, 0, 0, 0]
    assert f.min() >= 0.6 - 1e-6 and f.max() <= 1.4 + 1e-6 and f.min() < 0.65 and f.max() > 1.35
    assert abs(f.mean() - 1.0) < 0.05  # U[0.6, 1.4]: mean 1, sd 0.23, 300 draws
    # The earlier tf.image jitter needs non-empty contrast/saturation ranges: per-channel contrast
    # leaves a constant image alone, a 1e-6 saturation range hardly changes it.
    old = _jitter_many(image, (0.4, 0.4, 1e-6, 0.0), "additive_brightness")
    delta = old - colour  # one offset per image, the same for every channel (clipped at 0)
    assert np.ptp(delta.reshape(len(old), -1), axis=1).max() < 1e-5
    assert np.ptp(old / colour, axis=-1).max() > 0.05 and np.ptp(out - colour, axis=-1).max() > 0.05
    d = delta[:, 0, 0, 0]
    assert d.min() >= -0.4 - 1e-6 and d.max() <= 0.4 + 1e-6 and d.min() < -0.35 and d.max() > 0.35


def test_additive_mode_is_the_earlier_code_bit_for_bit():
    img = tf.constant(np.random.default_rng(2).uniform(size=(9, 7, 3)).astype(np.float32))
    for i in range(5):
        seed = tf.constant([5, i], tf.int64)
        s = augment.split_seed(seed, 5)
        x = tf.image.stateless_random_brightness(img, 0.4, s[1])
        x = tf.image.stateless_random_contrast(x, 0.6, 1.4, s[2])
        x = tf.image.stateless_random_saturation(x, 0.8, 1.2, s[3])
        x = tf.clip_by_value(tf.image.stateless_random_hue(x, 0.1, s[4]), 0.0, 1.0)
        want = x if tf.random.stateless_uniform([], s[0]) < 0.8 else img
        got = augment.color_jitter(img, seed, 0.8, (0.4, 0.4, 0.2, 0.1), "additive_brightness")
        np.testing.assert_array_equal(got.numpy(), want.numpy())


def test_jitter_params_ranges_and_uniform_random_order():
    n = 2400
    fn = tf.function(lambda s: tf.map_fn(
        lambda sd: augment.color_jitter_params(sd, (0.4, 0.4, 0.2, 0.1)), s,
        fn_output_signature=(tf.int32, tf.float32),
    ))
    seeds = tf.stack([tf.fill([n], tf.constant(13, tf.int64)), tf.range(n, dtype=tf.int64)], axis=1)
    order, factors = (t.numpy() for t in fn(seeds))
    low, high = np.array([0.6, 0.6, 0.8, -0.1]), np.array([1.4, 1.4, 1.2, 0.1])
    assert np.all(factors >= low - 1e-6) and np.all(factors <= high + 1e-6)
    np.testing.assert_allclose(factors.mean(0), (low + high) / 2, atol=0.02)
    counts = {p: 0 for p in itertools.permutations(range(4))}
    for row in order:
        counts[tuple(row)] += 1
    assert stats.chisquare(list(counts.values())).pvalue > 1e-3  # every one of the 24 orders, equally often


# ------------------------------------------------------------------------------------------------
# Config defaults and the pipeline
# ------------------------------------------------------------------------------------------------


def test_default_config_values_are_the_reference_ones():
    data = base_config().data
    assert data.crop_sampler == "torchvision" and data.resize_antialias is True
    assert tuple(data.crop_scale) == (0.2, 1.0)  # MAE main_pretrain: RandomResizedCrop(scale=(0.2, 1.0))
    data = multicrop_data(base_config().data)  # DINO main_dino DataAugmentationDINO
    assert data.color_jitter_impl == "torchvision"
    assert tuple(data.color_jitter) == (0.4, 0.4, 0.2, 0.1) and data.color_jitter_p == 0.8
    assert tuple(data.global_scale) == (0.4, 1.0) and tuple(data.local_scale) == (0.05, 0.4)
    assert (data.global_size, data.local_size, data.num_local) == (224, 96, 8)
    assert data.grayscale_p == 0.2 and data.solarize_p == 0.2
    assert tuple(data.global_blur) == (1.0, 0.1) and data.local_blur == 0.5
    assert tuple(data.blur_sigma) == (0.1, 2.0) and data.hflip is True


def _tiny_dino(**data):
    c = base_config()
    c.method, c.seed, c.total_steps, c.batch_size = "dino", 3, 3, 4
    c.model.image_size = 16
    multicrop_data(c.data)
    c.data.global_size, c.data.local_size, c.data.num_local = 16, 8, 1
    for k, v in data.items():
        c.data[k] = v
    return c


def _split():
    images = np.random.default_rng(0).integers(0, 256, (12, 20, 20, 3), dtype=np.uint8)
    return ImageSplit("synthetic", "train", images, np.zeros(12, np.int64), ["x"])


def test_multicrop_stream_is_a_pure_function_of_seed_and_step():
    c, split = _tiny_dino(), _split()
    first, resumed = list(train_batches(c, split, 0)), list(train_batches(c, split, 1))
    for a, b in zip(first[1:], resumed):  # a second pipeline, started at step 1, replays steps 1..
        np.testing.assert_array_equal(a["global"], b["global"])
        np.testing.assert_array_equal(a["local"], b["local"])


def test_old_crop_settings_are_the_earlier_code_bit_for_bit():
    img = tf.constant(np.random.default_rng(4).uniform(size=(20, 17, 3)).astype(np.float32))
    for i in range(4):
        seed = tf.constant([9, i], tf.int64)
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            tf.shape(img), tf.zeros([1, 0, 4]), seed=seed, min_object_covered=0.0, aspect_ratio_range=RATIO,
            area_range=(0.2, 1.0), max_attempts=10, use_image_if_no_bounding_boxes=True,
        )
        want = tf.clip_by_value(tf.image.resize(tf.slice(img, begin, size), [12, 12], method="bicubic"), 0.0, 1.0)
        got = augment.random_resized_crop(img, seed, 12, (0.2, 1.0), sampler="tf_bounding_box", antialias=False)
        np.testing.assert_array_equal(got.numpy(), want.numpy())


@pytest.mark.parametrize("key", ["crop_sampler", "color_jitter_impl"])
def test_unknown_choice_is_a_user_error(key):
    with pytest.raises(UserInputError, match=key):
        next(train_batches(_tiny_dino(**{key: "bogus"}), _split(), 0))
