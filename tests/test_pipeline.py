import numpy as np
import pytest
import tensorflow as tf

from ssl_ad.data.pipeline import batch_positions, example_indices, preprocess_eval, train_batches
from ssl_ad.data.sources import load_split
from ssl_ad.errors import UserInputError
from tests.conftest import tiny_mae_config


def test_mnist5k_split_is_stratified(data_dir):
    c = tiny_mae_config(data_dir)
    train, test = load_split(c.data, "train"), load_split(c.data, "test")
    assert train.images.shape == (4000, 28, 28, 1) and test.images.shape == (1000, 28, 28, 1)
    np.testing.assert_array_equal(np.bincount(train.labels), [400] * 10)
    np.testing.assert_array_equal(np.bincount(test.labels), [100] * 10)
    assert train.images.dtype == np.uint8 and train.class_names == [str(i) for i in range(10)]


def test_batches_shapes_range_and_determinism(data_dir):
    c = tiny_mae_config(data_dir, total_steps=4, batch_size=8)
    split = load_split(c.data, "train")
    batches = list(train_batches(c, split, 0))
    assert len(batches) == 4
    x = batches[0]["image"]
    assert x.shape == (8, 28, 28, 3) and x.dtype == np.float32
    # Normalised MNIST: background at (0 - 0.1307) / 0.3081, ink up to (1 - 0.1307) / 0.3081.
    assert x.min() >= -0.43 and x.max() <= 2.83 and x.max() > 2.0
    # Grey -> 3 identical channels.
    np.testing.assert_array_equal(x[..., 0], x[..., 2])
    again = list(train_batches(c, split, 0))
    for a, b in zip(batches, again):
        np.testing.assert_array_equal(a["image"], b["image"])
    # Starting at step 2 replays steps 2.. exactly (resume).
    resumed = list(train_batches(c, split, 2))
    assert len(resumed) == 2
    np.testing.assert_array_equal(resumed[0]["image"], batches[2]["image"])


def test_epochs_are_permutations_and_hosts_are_disjoint_and_complete():
    n, batch, hosts = 10, 4, 2
    seen = []
    for step in range(5):  # 20 positions = 2 full epochs
        positions = [batch_positions(tf.constant(step, tf.int64), batch, batch // hosts, p).numpy() for p in range(hosts)]
        assert not set(positions[0]) & set(positions[1])
        assert sorted(np.concatenate(positions)) == list(range(step * batch, (step + 1) * batch))
        seen.extend(np.concatenate([example_indices(tf.constant(p), n, seed=3).numpy() for p in positions]))
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert seen[:10] != seen[10:]  # a new order each epoch


def test_batch_larger_than_split_is_rejected(data_dir):
    c = tiny_mae_config(data_dir, batch_size=8192)
    with pytest.raises(UserInputError, match="larger than"):
        next(train_batches(c, load_split(c.data, "test"), 0))


def test_preprocess_eval_resizes_and_normalises():
    images = np.full((3, 28, 28, 1), 255, np.uint8)
    out = preprocess_eval(images, 32, (0.5,) * 3, (0.5,) * 3)
    assert out.shape == (3, 32, 32, 3)
    np.testing.assert_allclose(out, 1.0, atol=1e-5)


def test_multicrop_with_every_dino_augmentation(data_dir):
    """The paper's recipe (blur, solarise, jitter, grayscale all on) yields the crop shapes."""
    from configs import dino_mnist5k
    from ssl_ad.config_defaults import multicrop_data

    c = dino_mnist5k.get_config()
    c.data.data_dir = data_dir
    multicrop_data(c.data)
    c.data.global_size, c.data.local_size, c.data.num_local = 28, 12, 3
    c.total_steps, c.batch_size = 2, 4
    batch = next(train_batches(c, load_split(c.data, "test"), 0))
    assert batch["global"].shape == (4, 2, 28, 28, 3) and batch["local"].shape == (4, 3, 12, 12, 3)
    assert np.isfinite(batch["global"]).all() and np.isfinite(batch["local"]).all()
