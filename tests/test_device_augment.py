"""ssl_ad.data.device_augment: the tf.data recipes (ssl_ad.data.augment) as jitted JAX on the device.

Shapes and dtypes equal the host pipeline's; keys are per sample, deterministic per (seed, step);
the crop sampler has the tf.data sampler's distribution (two-sample KS tests, fixed seeds); the
resize, flip, colour, blur and solarisation ops agree with the tf.data ops for fixed parameters;
``data.augment_device`` is checked, old configs without it resume, and a tiny DINO train.py run
with it on trains; a sharded batch (4 CPU devices) gets the same crops as one device, and a run
resumed with it is bit-identical to an uninterrupted one.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

from ssl_ad.config_check import flat_config, validate_train_config
from ssl_ad.data import augment
from ssl_ad.data import device_augment as da
from ssl_ad.data.pipeline import example_indices, batch_positions, train_batches
from ssl_ad.data.split import ImageSplit
from ssl_ad.errors import UserInputError
from ssl_ad.train.config_history import ResumeCheck
from ssl_ad.train.loop import train_and_evaluate
from ssl_ad.train.metrics_log import read_metrics
from tests.conftest import REPO, tiny_config, tiny_train_argv


def _split(n=32, side=28, channels=1, seed=0) -> ImageSplit:
    images = np.random.default_rng(seed).integers(0, 256, (n, side, side, channels), dtype=np.uint8)
    return ImageSplit("fake", "train", images, np.arange(n) % 10, [str(i) for i in range(10)])


def _smooth(shape, seed=0) -> np.ndarray:
    """A float32 image in [0, 1] with structure at several scales (not white noise)."""
    rng = np.random.default_rng(seed)
    h, w, _ = shape
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(2 * np.pi * (rng.uniform(1, 4) * xx + rng.uniform(1, 4) * yy)) for _ in range(shape[2])], -1)
    return np.clip(0.5 + 0.35 * base + rng.normal(0, 0.1, shape), 0, 1).astype(np.float32)


@pytest.mark.parametrize("method", ["dino", "mae"])
def test_shapes_and_dtypes_match_the_host_pipeline(method):
    host = tiny_config(method, "", total_steps=2)
    dev = tiny_config(method, "", total_steps=2, **{"data.augment_device": True})
    split = _split()
    want = next(train_batches(host, split, 0))
    raw = next(train_batches(dev, split, 0))
    assert set(raw) == {"image"} and raw["image"].dtype == np.uint8 and raw["image"].shape == (16, 28, 28, 1)
    # The host only gathers: the same images, in the same order, as the tf.data recipe reads.
    idx = example_indices(batch_positions(tf.constant(0, tf.int64), 16, 16, 0), len(split), 0).numpy()
    np.testing.assert_array_equal(raw["image"], split.images[idx])
    out = jax.jit(da.batch_augmenter(dev))(raw, 0)
    assert {k: (v.shape, v.dtype) for k, v in out.items()} == {k: (v.shape, v.dtype) for k, v in want.items()}
    for v in out.values():
        assert np.all(np.isfinite(v))
        # Normalised [0, 1] values: the same range as the host's.
        lo = (0 - max(host.data.mean)) / min(host.data.std)
        hi = (1 - min(host.data.mean)) / min(host.data.std)
        assert lo - 1e-4 <= float(v.min()) and float(v.max()) <= hi + 1e-4


def test_per_sample_keys_differ_and_a_fixed_step_is_deterministic():
    c = tiny_config("dino", "", **{"data.augment_device": True})
    fn = jax.jit(da.batch_augmenter(c))
    same = np.repeat(_split(1, seed=3).images, 4, axis=0)  # one image four times
    a, again, other = fn({"image": same}, 5), fn({"image": same}, 5), fn({"image": same}, 6)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(again[k]))
        views = np.asarray(a[k])
        for i in range(1, 4):  # the same image gives other crops in every sample ...
            assert not np.allclose(views[0], views[i])
        assert not np.allclose(views, np.asarray(other[k]))  # ... and at every step
    # The keys: fold_in(fold_in(fold_in(key(seed), step), AUGMENT_STREAM), i), as documented.
    keys = da.sample_keys(c.seed, 5, 4)
    base = jax.random.fold_in(jax.random.fold_in(jax.random.key(c.seed), 5), da.AUGMENT_STREAM)
    np.testing.assert_array_equal(jax.random.key_data(keys[2]), jax.random.key_data(jax.random.fold_in(base, 2)))


def _tf_boxes(n, height, width, scale):
    fn = tf.function(lambda s: tf.map_fn(
        lambda seed: augment.torchvision_crop_box(height, width, seed, scale), s, fn_output_signature=tf.int32))
    seeds = tf.stack([tf.fill([n], tf.constant(7, tf.int64)), tf.range(n, dtype=tf.int64)], axis=1)
    return fn(seeds).numpy().astype(np.float64)


def _jax_boxes(n, height, width, scale):
    keys = jax.random.split(jax.random.key(11), n)
    return np.asarray(jax.jit(jax.vmap(lambda k: da.crop_box(k, height, width, scale)))(keys), np.float64)


@pytest.mark.parametrize("height,width,scale", [(224, 224, (0.05, 0.4)), (256, 256, (0.4, 1.0)), (20, 80, (0.6, 1.0))])
def test_crop_boxes_have_the_tf_data_samplers_distribution(height, width, scale):
    n = 3000
    ref, got = _tf_boxes(n, height, width, scale), _jax_boxes(n, height, width, scale)
    for boxes in (ref, got):
        top, left, h, w = boxes.T
        assert np.all((h >= 1) & (w >= 1) & (top >= 0) & (left >= 0) & (top + h <= height) & (left + w <= width))

    def features(boxes):
        top, left, h, w = boxes.T
        return {
            "area": h * w / (height * width),
            "log_aspect": np.log(w / h),
            "top": (top + 0.5) / (height - h + 1),  # offsets as a fraction of the room
            "left": (left + 0.5) / (width - w + 1),
        }

    fr, fg = features(ref), features(got)
    for name in fr:
        p = stats.ks_2samp(fr[name], fg[name]).pvalue
        assert p > 1e-3, f"{name}: KS p = {p:.2g} (tf mean {fr[name].mean():.4f}, jax mean {fg[name].mean():.4f})"
    if width / height > 4 / 3:  # the centre-crop fallback happens as often in both
        fallback = lambda b: np.mean((b[:, 2] == height) & (b[:, 3] == round(height * 4 / 3)))  # noqa: E731
        assert abs(fallback(ref) - fallback(got)) < 0.03 and fallback(got) > 0.1


@pytest.mark.parametrize("antialias", [True, False])
@pytest.mark.parametrize("box", [(3, 5, 30, 36), (2, 4, 10, 12), (0, 0, 30, 10), (0, 0, 40, 48)])
def test_resized_crop_and_flip_match_tf(box, antialias):
    image = _smooth((40, 48, 3))
    crop = tf.slice(image, [box[0], box[1], 0], [box[2], box[3], 3])
    ref = augment.resize_bicubic(crop, 16, antialias, max_hw=(40, 48)).numpy()
    got = np.asarray(da.resized_crop(jnp.asarray(image), jnp.asarray(box, jnp.float32), 16, antialias))
    np.testing.assert_allclose(got, ref, atol=2e-3)
    flipped = np.asarray(da.resized_crop(jnp.asarray(image), jnp.asarray(box, jnp.float32), 16, antialias, True))
    np.testing.assert_allclose(flipped, tf.image.flip_left_right(ref).numpy(), atol=2e-3)


@pytest.mark.parametrize("name,factor", [("brightness", 1.35), ("brightness", 0.6), ("contrast", 1.4),
                                         ("contrast", 0.6), ("saturation", 1.2), ("saturation", 0.8),
                                         ("hue", 0.09), ("hue", -0.1)])
def test_colour_ops_match_tf(name, factor):
    x = _smooth((16, 20, 3), seed=2)
    ref = getattr(augment, f"adjust_{name}")(tf.constant(x), tf.constant(factor, tf.float32)).numpy()
    got = np.asarray(getattr(da, f"adjust_{name}")(jnp.asarray(x), jnp.float32(factor)))
    np.testing.assert_allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize("order", [(0, 1, 2, 3), (3, 2, 1, 0), (1, 3, 0, 2), (2, 0, 3, 1)])
def test_colour_jitter_in_a_given_order_matches_tf(order):
    x = _smooth((12, 12, 3), seed=4)
    strength = (0.4, 0.4, 0.2, 0.1)
    factors = np.array([1.3, 0.7, 1.15, -0.06], np.float32)
    ref = augment.apply_color_jitter(tf.constant(x), tf.constant(order, tf.int32), tf.constant(factors), strength)
    got = da.apply_color_jitter(jnp.asarray(x), jnp.asarray(order, jnp.int32), jnp.asarray(factors), strength)
    np.testing.assert_allclose(np.asarray(got), ref.numpy(), atol=1e-5)
    # Under vmap (every branch computed, one selected) the result is the same.
    batched = jax.vmap(lambda o: da.apply_color_jitter(jnp.asarray(x), o, jnp.asarray(factors), strength))(
        jnp.asarray([order, order], jnp.int32))
    np.testing.assert_allclose(np.asarray(batched[1]), ref.numpy(), atol=1e-5)


def test_jitter_parameters_are_uniform_in_their_ranges():
    u = jax.random.uniform(jax.random.key(0), (4000, 5))
    orders, factors = jax.vmap(lambda v: da.jitter_params(v, (0.4, 0.4, 0.2, 0.1)))(u)
    factors = np.asarray(factors)
    np.testing.assert_allclose(factors.min(0), [0.6, 0.6, 0.8, -0.1], atol=0.01)
    np.testing.assert_allclose(factors.max(0), [1.4, 1.4, 1.2, 0.1], atol=0.01)
    counts = np.unique([tuple(o) for o in np.asarray(orders)], axis=0, return_counts=True)[1]
    assert len(counts) == 24 and counts.min() > 4000 / 24 * 0.6  # all 24 orders, about equally often
    with pytest.raises(UserInputError, match="hue <= 0.5"):
        da.jitter_params(u[0], (0.4, 0.4, 0.2, 0.6))


def test_blur_grayscale_and_solarize_match_tf():
    x = _smooth((24, 24, 3), seed=5)
    seed = tf.constant([3, 9], tf.int64)
    ref = augment.gaussian_blur(tf.constant(x), seed, 1.0, (0.1, 2.0)).numpy()
    sigma = tf.random.stateless_uniform([], augment.split_seed(seed, 2)[1], 0.1, 2.0).numpy()
    got = np.asarray(da.blur(jnp.asarray(x), jnp.float32(sigma), 2.0))
    np.testing.assert_allclose(got, ref, atol=1e-5)
    grey = tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(x)).numpy()
    np.testing.assert_allclose(np.broadcast_to(np.asarray(da.grayscale(jnp.asarray(x))), x.shape), grey, atol=1e-6)
    always = da.solarize(jnp.asarray(x), jax.random.key(0), 1.0, 1.0)
    np.testing.assert_array_equal(np.asarray(always), np.where(x < 0.5, x, 1.0 - x))
    np.testing.assert_array_equal(np.asarray(da.solarize(jnp.asarray(x), jax.random.key(0), 0.0, 0.0)), x)


def test_view_probabilities():
    """Grayscale p = 0.2 in both global views; solarisation p = 0 in view 1 and 0.2 in view 2."""
    c = tiny_config("dino", "", **{"data.augment_device": True, "data.color_jitter_p": 0.0, "data.grayscale_p": 0.2,
                                   "data.solarize_p": 0.2, "data.global_blur": (1.0, 0.1)})
    r = da.DeviceRecipe.from_config(c)
    colour = np.array([0.9, 0.7, 0.6], np.float32)  # luma 0.75: solarised pixels fall below 0.5
    image = jnp.asarray(np.broadcast_to(colour, (28, 28, 3)))
    keys = jax.random.split(jax.random.key(1), 3000)
    views = jax.jit(jax.vmap(lambda k: da.multicrop(image, k, r)["global"]))(keys)
    centre = np.asarray(views)[:, :, 14, 14] * np.asarray(r.std) + np.asarray(r.mean)  # (n, 2 views, 3)
    grey = np.mean(np.ptp(centre, axis=-1) < 1e-4, axis=0)
    solarised = np.mean(centre.mean(-1) < 0.5, axis=0)
    np.testing.assert_allclose(grey, [0.2, 0.2], atol=0.025)
    np.testing.assert_allclose(solarised, [0.0, 0.2], atol=0.025)


def test_config_key_is_checked_and_old_configs_resume():
    c = tiny_config("dino", "", **{"data.augment_device": True})
    validate_train_config(c)
    for key, value in (("data.crop_sampler", "tf_bounding_box"), ("data.color_jitter_impl", "additive_brightness")):
        bad = tiny_config("dino", "", **{"data.augment_device": True, key: value})
        with pytest.raises(UserInputError, match="augment_device"):
            validate_train_config(bad)
    plain = tiny_config("dino", "").to_dict()
    plain["data"]["augment_device"] = 1  # not a bool (a config file can set anything)
    loose = ml_collections.ConfigDict(plain)
    with pytest.raises(UserInputError, match="augment_device"):
        validate_train_config(loose)
    # A config saved before the key existed resumes unchanged under the default (host augmentation).
    new = tiny_config("dino", "")
    old = flat_config(new)
    del old["data.augment_device"]
    check = ResumeCheck(old, flat_config(new), 10, set())
    assert not check.refused and check.new_keys == {"data.augment_device": False}
    with pytest.raises(UserInputError, match="crop_sampler"):
        da.DeviceRecipe.from_config(ml_collections.ConfigDict(
            {"seed": 0, "model": {"image_size": 28}, "data": {"augment": "single", "crop_sampler": "tf_bounding_box"}}))


def test_tiny_dino_train_py_run_with_device_augmentation(tmp_path, data_dir):
    workdir = tmp_path / "run"
    argv = tiny_train_argv("dino", data_dir, workdir, {
        "data.augment_device": True, "total_steps": 6, "log_every": 2, "checkpoint_every": 100,
        "optim.warmup_steps": 1, "optim.freeze_steps": 0,
    })
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(workdir / "summary.json") as f:
        summary = json.load(f)
    assert summary["status"] == "complete" and summary["step"] == 6
    rows = read_metrics(str(workdir / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [2, 4, 6] and all(np.isfinite(r["loss"]) for r in rows)
    with open(workdir / "config.json") as f:
        assert json.load(f)["data"]["augment_device"] is True


_SHARDED = r"""
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
sys.path.insert(0, {repo!r})
import jax, numpy as np
from ssl_ad import sharding
from ssl_ad.data import device_augment as da
from tests.conftest import tiny_config
c = tiny_config("dino", "", **{{"data.augment_device": True}})
images = np.random.default_rng(0).integers(0, 256, (8, 28, 28, 1), dtype=np.uint8)
fn = jax.jit(da.batch_augmenter(c))
mesh = sharding.data_mesh()
sharded = fn(sharding.shard_batch({{"image": images}}, mesh), 3)
single = fn({{"image": jax.device_put(images, jax.devices()[0])}}, 3)
assert jax.device_count() == 4
for k in single:
    assert sharded[k].sharding.is_equivalent_to(sharding.batch_sharding(mesh), sharded[k].ndim), k
    np.testing.assert_allclose(np.asarray(sharded[k]), np.asarray(single[k]), atol=1e-5)
print("OK")
"""


def test_sharded_batch_gives_the_same_crops_as_one_device():
    """The crops depend on (seed, step, position in the global batch), not on how it is split."""
    proc = subprocess.run([sys.executable, "-c", _SHARDED.format(repo=REPO)], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_resume_with_device_augmentation_is_bit_identical(tmp_path, data_dir):
    """The crops are a function of (seed, step, position): a resumed run sees the same batches."""
    c = tiny_config("dino", data_dir, **{"data.augment_device": True, "total_steps": 4, "log_every": 2,
                                         "checkpoint_every": 2, "optim.warmup_steps": 1})
    straight = train_and_evaluate(c, str(tmp_path / "a"))
    os.makedirs(tmp_path / "b" / "checkpoints")
    shutil.copytree(tmp_path / "a" / "checkpoints" / "2", tmp_path / "b" / "checkpoints" / "2")
    resumed = train_and_evaluate(c, str(tmp_path / "b"))
    assert int(straight.step) == int(resumed.step) == 4
    a = jax.device_get((straight.params, straight.extra))
    b = jax.device_get((resumed.params, resumed.extra))
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(x, y)
