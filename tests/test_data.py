"""vdm.data and vdm.toy_data: shapes and scaling of every source, determinism, sharding, epochs, densities."""
import math
import shutil

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from sklearn.datasets import load_digits

from vdm import data, toy_data
from vdm.data import sources


def make(overrides=None, *, split="train", batch=8, seed=0, process_index=0, process_count=1, devices=1):
    cfg = ml_collections.ConfigDict({**data.default_config().to_dict(), **(overrides or {})})
    return data.build_dataset(cfg, split=split, global_batch_size=batch, seed=seed,
                              process_index=process_index, process_count=process_count,
                              local_device_count=devices)


def levels(x):
    """x = k / 127.5 - 1 -> k (float)."""
    return (np.asarray(x, np.float64) + 1.0) * 127.5


def assert_on_grid(x):
    k = levels(x)
    np.testing.assert_allclose(k, np.round(k), atol=1e-3)
    assert k.min() >= -1e-3 and k.max() <= 255 + 1e-3


def all_examples(ds, batch_size):
    """The whole split via iterate_epoch, padding removed: (x [N, ...], labels [N] or None)."""
    xs, labels = [], []
    for b in ds.iterate_epoch(batch_size):
        m = b["mask"].reshape(-1)
        xs.append(b["x"].reshape((-1,) + ds.data_shape)[m])
        if "label" in b:
            labels.append(b["label"].reshape(-1)[m])
    return np.concatenate(xs), (np.concatenate(labels) if labels else None)


def sorted_rows(a):
    a = np.asarray(a).reshape(len(a), -1)
    return a[np.lexsort(a.T[::-1])]


# --- digits (the embedded default) --------------------------------------------


def test_digits_shapes_scaling_and_fixed_split():
    train = make(split="train", batch=16, devices=2)
    test = make(split="test", batch=16, devices=2)
    assert (train.num_examples, test.num_examples) == (1500, 297)
    assert train.data_shape == (8, 8, 1) and train.num_classes == 10 and train.is_discrete_8bit
    b = train.get_batch(0)
    assert b["x"].shape == (2, 8, 8, 8, 1) and b["x"].dtype == np.float32
    assert b["label"].shape == (2, 8) and b["label"].dtype == np.int32
    assert_on_grid(b["x"])
    # train + test is exactly the 1797 scans, 17 grey levels v mapped to round(v * 255 / 16).
    digits = load_digits()
    expected = np.round(digits.images * 255 / 16)
    x_tr, y_tr = all_examples(train, 64)
    x_te, y_te = all_examples(test, 64)
    got = np.concatenate([levels(x_tr), levels(x_te)])[..., 0]
    np.testing.assert_allclose(sorted_rows(got), sorted_rows(expected), atol=1e-3)
    # Labels travel with their images.
    joined = lambda x, y: sorted_rows(np.concatenate([x.reshape(len(x), -1), y[:, None]], 1))
    np.testing.assert_allclose(
        joined(np.concatenate([levels(x_tr), levels(x_te)])[..., 0], np.concatenate([y_tr, y_te])),
        joined(expected, digits.target), atol=1e-3)
    # The split does not depend on the run seed.
    np.testing.assert_array_equal(all_examples(make(split="test", seed=7), 64)[1], y_te)


def test_pad_to_centres_the_image_on_black():
    plain, padded = make(split="test"), make({"pad_to": 12}, split="test")
    assert padded.data_shape == (12, 12, 1)
    x, xp = plain.get_batch(0)["x"], padded.get_batch(0)["x"]
    np.testing.assert_array_equal(xp[:, :, 2:10, 2:10], x)
    border = np.ones(xp.shape, bool)
    border[:, :, 2:10, 2:10] = False
    assert np.all(xp[border] == -1.0)


def test_dequantization_is_uniform_over_the_decoder_bin():
    ds, grid = make({"dequantize": True}, batch=256), make(batch=256)
    assert not ds.is_discrete_8bit
    k = np.concatenate([levels(ds.get_batch(s)["x"]).ravel() for s in range(4)])
    k_grid = np.concatenate([levels(grid.get_batch(s)["x"]).ravel() for s in range(4)])
    offset = k - k_grid  # same seed and steps, so the same examples: the noise, in grey levels
    assert np.abs(offset).max() <= 0.5 + 1e-3  # inside the bin of width 2/255 around the grid point
    freq, _ = np.histogram(offset, bins=10, range=(-0.5, 0.5))
    np.testing.assert_allclose(freq / len(offset), 0.1, atol=0.006)  # uniform


def test_random_flips_mirror_about_half_of_the_training_examples():
    plain, flipped = make(batch=256), make({"random_flip": True}, batch=256)
    x, xf = plain.get_batch(1)["x"][0], flipped.get_batch(1)["x"][0]
    same = np.all(xf == x, axis=(1, 2, 3))
    mirrored = np.all(xf == x[:, :, ::-1], axis=(1, 2, 3))
    assert np.all(same | mirrored)
    assert 80 < np.sum(mirrored & ~same) < 176
    # Evaluation never flips.
    ev = make({"random_flip": True}, split="test")
    unflipped = make(split="test")
    np.testing.assert_array_equal(next(ev.iterate_epoch(8))["x"], next(unflipped.iterate_epoch(8))["x"])


# --- determinism, sharding, epochs ---------------------------------------------------


def test_batches_are_a_pure_function_of_seed_and_step():
    cfg = {"dequantize": True, "random_flip": True}
    a, b = make(cfg, batch=32), make(cfg, batch=32)
    want = {s: a.get_batch(s) for s in (0, 5, 93)}  # 93 * 32 positions: epoch 1
    for s in (93, 5, 0, 93):  # another object, random access in another order
        for key in ("x", "label"):
            np.testing.assert_array_equal(b.get_batch(s)[key], want[s][key])
    assert not np.array_equal(a.get_batch(0)["x"], a.get_batch(1)["x"])
    assert not np.array_equal(a.get_batch(0)["x"], make(cfg, batch=32, seed=1).get_batch(0)["x"])


@pytest.mark.parametrize("cfg", [{"dequantize": True, "random_flip": True},
                                 {"source": "toy", "name": "moons"},
                                 {"source": "toy", "name": "mixture1d", "num_points": 50}])
def test_process_shards_are_disjoint_and_form_the_global_batch(cfg):
    B = 24
    ref = make(cfg, batch=B)
    for step in (0, 70):
        want = ref.get_batch(step)
        for P, L in [(2, 1), (2, 2), (3, 2), (4, 3)]:
            shards = [make(cfg, batch=B, process_index=i, process_count=P, devices=L).get_batch(step)
                      for i in range(P)]
            for key in want:
                assert shards[0][key].shape[:2] == (L, B // (P * L))
                got = np.concatenate([s[key].reshape((-1,) + s[key].shape[2:]) for s in shards])
                np.testing.assert_array_equal(got, want[key].reshape(got.shape))


def test_evaluation_shards_form_the_ordered_split():
    cfg = {"dequantize": True}
    ref = list(make(cfg, split="test").iterate_epoch(40))
    parts = [list(make(cfg, split="test", process_index=i, process_count=2, devices=2).iterate_epoch(40))
             for i in range(2)]
    assert len(ref) == len(parts[0]) == len(parts[1]) == math.ceil(297 / 40)
    for k, r in enumerate(ref):
        for key in ("x", "label", "mask"):
            got = np.concatenate([p[k][key].reshape((-1,) + p[k][key].shape[2:]) for p in parts])
            np.testing.assert_array_equal(got, r[key].reshape(got.shape))
    assert ref[-1]["mask"].sum() == 297 - 7 * 40


def test_each_epoch_visits_every_example_once(tmp_path):
    n = 10
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8), y=np.arange(n))
    cfg = {"source": "npz", "path": str(tmp_path / "d.npz"), "npz_label_key": "y", "num_test": 0}
    ds = make(cfg, batch=4)
    seen = np.concatenate([ds.get_batch(s)["label"].ravel() for s in range(10)])  # 40 positions, 4 epochs
    epochs = seen.reshape(4, n)
    for e in epochs:
        np.testing.assert_array_equal(np.sort(e), np.arange(n))
    assert len({tuple(e) for e in epochs}) == 4  # reshuffled every epoch
    other = np.concatenate([make(cfg, batch=4, seed=1).get_batch(s)["label"].ravel() for s in range(3)])
    assert not np.array_equal(other[:n], epochs[0])


# --- TFDS -----------------------------------------------------------------------------


def test_tfds_data_source_batches():
    with tfds.testing.mock_data(num_examples=20):
        ds = make({"source": "tfds", "name": "mnist"}, batch=8, devices=2)
        assert ds.num_examples == 20 and ds.data_shape == (28, 28, 1) and ds.num_classes == 10
        b = ds.get_batch(3)
        assert b["x"].shape == (2, 4, 28, 28, 1) and b["label"].shape == (2, 4)
        assert_on_grid(b["x"])
        assert b["label"].min() >= 0 and b["label"].max() < 10
        raw = tfds.data_source("mnist", split="test")  # the examples as TFDS gives them
        x, y = all_examples(make({"source": "tfds", "name": "mnist"}, split="test", batch=8), 8)
        assert len(x) == 20
        np.testing.assert_allclose(levels(x[7]), raw[7]["image"], atol=1e-3)
        assert y[7] == raw[7]["label"]
        resized = make({"source": "tfds", "name": "mnist", "image_size": 16, "pad_to": 20,
                        "dequantize": True}, batch=4)
        assert resized.data_shape == (20, 20, 1)
        xr = resized.get_batch(0)["x"]
        assert xr.shape == (1, 4, 20, 20, 1) and xr.min() >= -1 - 1 / 255 and xr.max() <= 1 + 1 / 255


class TinyGrey(tfds.core.GeneratorBasedBuilder):
    """A real (unmocked) TFDS builder: example i is a 6x5 image of grey level 10 i, label i % 3."""

    VERSION = tfds.core.Version("1.0.0")
    # A one-part module name: TFDS would otherwise look the test package up as a resource
    # (DatasetBuilder.code_path), which needs the uninstalled importlib_resources.
    __module__ = "tiny_grey"

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(6, 5, 1)), "label": tfds.features.ClassLabel(num_classes=3)}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(7), "test": self._generate_examples(3)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"image": np.full((6, 5, 1), 10 * i, np.uint8), "label": i % 3}


def test_tfds_reads_real_array_record_files(tmp_path):
    TinyGrey(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    cfg = {"source": "tfds", "name": "tiny_grey", "data_dir": str(tmp_path)}
    ds = make(cfg, batch=7)
    assert (ds.num_examples, ds.data_shape, ds.num_classes) == (7, (6, 5, 1), 3)
    b = ds.get_batch(0)
    k = levels(b["x"][0, :, 0, 0, 0])
    np.testing.assert_allclose(np.sort(k), 10 * np.arange(7), atol=1e-3)  # one epoch: every example once
    np.testing.assert_array_equal(b["label"][0], np.round(k / 10).astype(int) % 3)
    x, y = all_examples(make(cfg, split="test", batch=2), 2)  # in the stored order (TFDS shuffles on prepare)
    k = levels(x[:, 0, 0, 0])
    np.testing.assert_allclose(np.sort(k), [0, 10, 20], atol=1e-3)
    np.testing.assert_array_equal(y, np.round(k / 10).astype(int) % 3)


# --- folder and npz -------------------------------------------------------------------


def test_image_folder_resize_centre_crop_and_split(tmp_path):
    (tmp_path / "sub").mkdir()
    # 48x32 (WxH): green centre 32x32, red 8-pixel bands left and right -> fitted to 16: all green.
    im = np.zeros((32, 48, 3), np.uint8)
    im[:, :, 1] = 255
    im[:, :8] = im[:, -8:] = (255, 0, 0)
    Image.fromarray(im).save(tmp_path / "a.png")
    Image.fromarray(np.full((50, 20, 3), 200, np.uint8)).save(tmp_path / "sub" / "b.JPG")
    Image.fromarray(np.full((16, 16), 30, np.uint8)).save(tmp_path / "c.jpeg")
    (tmp_path / "notes.txt").write_text("not an image")
    cfg = {"source": "folder", "path": str(tmp_path), "image_size": 16, "num_test": 0}
    ds = make(cfg, batch=3)
    assert ds.num_examples == 3 and ds.data_shape == (16, 16, 3) and ds.num_classes == 0
    assert ds.is_discrete_8bit and set(ds.get_batch(0)) == {"x"}
    x, _ = all_examples(ds, 3)
    assert x.shape == (3, 16, 16, 3)
    assert_on_grid(x)
    k = levels(x[0])  # sorted paths: a.png, c.jpeg, sub/b.JPG
    assert np.all(k[..., 1] > 200) and np.all(k[..., 0] < 60)
    np.testing.assert_allclose(levels(x[1]), 30, atol=1e-3)
    np.testing.assert_allclose(levels(x[2]), 200, atol=2)  # jpeg
    grey = make({**cfg, "channels": 1}, batch=3)
    assert grey.data_shape == (16, 16, 1)
    train, test = make({**cfg, "num_test": 1}, batch=2), make({**cfg, "num_test": 1}, split="test", batch=1)
    assert (train.num_examples, test.num_examples) == (2, 1)


def test_image_folder_sub_folders_are_the_classes(tmp_path):
    """data.conditional on a folder: an image's top-level sub-folder is its class, numbered in
    sorted name order (ImageFolder's rule), through every worker count and both splits; images
    directly under the folder, or a single class, are refused naming config.data.conditional."""
    grey = {"bird": 40, "cat": 120, "dog": 220}  # each class's grey level identifies it in the batch
    for name, level in grey.items():
        for i in range(3):
            (tmp_path / name / ("deeper" if i == 2 else "")).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 8), level, np.uint8)).save(
                tmp_path / name / ("deeper" if i == 2 else "") / f"{i}.png")
    cfg = {"source": "folder", "path": str(tmp_path), "image_size": 8, "channels": 1, "num_test": 3,
           "conditional": True}
    for split, n in (("train", 6), ("test", 3)):
        for workers in (1, 2):
            ds = make({**cfg, "workers": workers}, split=split, batch=n)
            assert ds.num_classes == 3
            x, y = all_examples(ds, n)
            classes = np.argmin(np.abs(levels(x)[:, 0, 0, 0, None] - np.array(list(grey.values()))), axis=1)
            np.testing.assert_array_equal(y, classes)
    assert set(all_examples(make(cfg, batch=6), 6)[1]) | set(all_examples(make(cfg, split="test", batch=3), 3)[1]) \
        == {0, 1, 2}
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "loose.png")
    with pytest.raises(ValueError, match=r"config\.data\.conditional.*no class sub-folder.*loose\.png"):
        make(cfg, batch=6)
    (tmp_path / "loose.png").unlink()
    for name in ("cat", "dog"):
        shutil.rmtree(tmp_path / name)
    with pytest.raises(ValueError, match=r"config\.data\.conditional.*has 1 \(\['bird'\]\)"):
        make(cfg, batch=2)


def test_npz_images_and_float_data(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 6, 6), dtype=np.uint8)
    points = rng.normal(size=(30, 3)).astype(np.float32)
    np.savez(tmp_path / "d.npz", images=images, points=points, labels=np.arange(30) % 4)
    cfg = {"source": "npz", "path": str(tmp_path / "d.npz"), "npz_key": "images", "num_test": 5}
    ds = make({**cfg, "npz_label_key": "labels"}, batch=5)
    assert ds.data_shape == (6, 6, 1) and ds.num_classes == 4 and ds.num_examples == 25
    x_tr, _ = all_examples(ds, 5)
    x_te, _ = all_examples(make(cfg, split="test", batch=5), 5)
    np.testing.assert_allclose(sorted_rows(levels(np.concatenate([x_tr, x_te]))[..., 0]), sorted_rows(images),
                               atol=1e-3)
    fl = make({**cfg, "npz_key": "points", "num_test": 0}, batch=10)
    assert fl.data_shape == (3,) and not fl.is_discrete_8bit
    np.testing.assert_array_equal(sorted_rows(all_examples(fl, 10)[0]), sorted_rows(points))


# --- bad configs fail first, naming the field ------------------------------------------


@pytest.fixture
def no_reads(monkeypatch):
    """Any attempt to read data fails the test: the error must come from validation."""
    def forbidden(*a, **k):
        raise AssertionError("data was read before the config was validated")
    monkeypatch.setattr(tfds, "data_source", forbidden)
    monkeypatch.setattr(sources, "load_digits", forbidden)


def test_bad_configs_fail_before_reading_data(tmp_path, no_reads):
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 2), np.float32))
    (tmp_path / "empty").mkdir()
    cases = [
        ({"sorce": "digits"}, "sorce"),
        ({"source": "imagenet"}, "data.source"),
        ({"source": "tfds", "name": "no_such_dataset"}, "data.name"),
        ({"source": "tfds", "name": ""}, "data.name"),
        ({"source": "toy", "name": "spiral"}, "data.name"),
        ({"source": "toy", "name": "moons", "dequantize": True}, "data.dequantize"),
        ({"source": "folder", "path": str(tmp_path / "missing"), "image_size": 8}, "data.path"),
        ({"source": "folder", "path": str(tmp_path / "empty"), "image_size": 8}, "data.path"),
        ({"source": "npz", "path": str(tmp_path / "missing.npz")}, "data.path"),
        ({"source": "npz", "path": str(tmp_path / "d.npz"), "npz_key": "images"}, "data.npz_key"),
        ({"image_size": -1}, "data.image_size"),
        ({"image_size": "32"}, "data.image_size"),
    ]
    for overrides, field in cases:
        with pytest.raises(ValueError, match=field.replace(".", r"\.")):
            make(overrides)


def test_bad_sizes_and_batches_fail_with_the_field_named(tmp_path):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="data.image_size"):
        make({"source": "folder", "path": str(tmp_path), "image_size": 0})
    with pytest.raises(ValueError, match="data.pad_to"):
        make({"pad_to": 6})
    with pytest.raises(ValueError, match="data.num_test"):
        make({"num_test": 1797})
    with pytest.raises(ValueError, match="global_batch_size"):
        make(batch=10, process_count=2, devices=3)
    with pytest.raises(ValueError, match="split"):
        make(split="validation")
    with pytest.raises(ValueError, match="num_points"):
        make({"source": "toy", "name": "moons"}).iterate_epoch(8).__next__()


# --- toy data -----------------------------------------------------------------------------

WITH_DENSITY = [n for n, d in toy_data.TOY_DISTRIBUTIONS.items() if d.log_prob is not None]


def _grid(dist, lim, n):
    """Cell midpoints of a regular grid on [-lim, lim]^dim and the cell volume."""
    edges = np.linspace(-lim, lim, n + 1)
    mids = (edges[1:] + edges[:-1]) / 2
    pts = np.stack(np.meshgrid(*[mids] * dist.dim, indexing="ij"), -1).reshape(-1, dist.dim)
    return pts, (edges[1] - edges[0]) ** dist.dim


@pytest.mark.parametrize("name", WITH_DENSITY)
def test_toy_density_integrates_to_one_and_matches_samples(name):
    dist = toy_data.get(name)
    lim, n = (10.0, 4000) if dist.dim == 1 else (5.0, 200)
    pts, vol = _grid(dist, lim, n)
    log_prob = jax.jit(dist.log_prob)
    p = np.exp(np.asarray(log_prob(pts), np.float64))
    assert abs(p.sum() * vol - 1.0) < 1e-4
    # Histogram of 20000 samples vs the density's mass per bin (bins of 25 (1-D) or 20x20 (2-D) cells).
    samples = dist.sample(np.random.default_rng(1), 20000)
    assert samples.shape == (20000, dist.dim) and samples.dtype == np.float32
    k = 25 if dist.dim == 1 else 20
    blocks = [s for _ in range(dist.dim) for s in (n // k, k)]  # [bins, cells per bin] per axis
    mass = (p * vol).reshape(blocks).sum(axis=tuple(range(1, 2 * dist.dim, 2)))
    counts, _ = np.histogramdd(samples, bins=[n // k] * dist.dim, range=[(-lim, lim)] * dist.dim)
    freq = counts / len(samples)
    assert np.all(np.abs(freq - mass) <= 5 * np.sqrt(mass * (1 - mass) / len(samples)) + 2e-3)
    assert abs(freq.sum() - 1) < 1e-3
    # Cross-entropy of the samples under log_prob = the entropy of the density (a wrong scale would not).
    lp = np.asarray(log_prob(samples), np.float64)
    neg_entropy = np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)) * vol
    assert abs(lp.mean() - neg_entropy) < 5 * lp.std() / np.sqrt(len(lp)) + 1e-3


def test_toy_parameters_match_the_seeds():
    x = toy_data.get("mixture1d").sample(0, 60000)[:, 0]
    assert abs(np.mean(x < 0) - 1 / 3) < 0.01 and abs(x[x > 0].mean() - 4) < 0.03
    # Swiss roll: (t cos t, t sin t) / 10 with t in [1.5 pi, 4.5 pi] (sklearn, noise 0).
    s = toy_data.get("swissroll").sample(0, 1000).astype(np.float64) * 10
    t = np.linalg.norm(s, axis=1)
    assert t.min() >= 1.5 * np.pi - 1e-3 and t.max() <= 4.5 * np.pi + 1e-3
    np.testing.assert_allclose(s, np.stack([t * np.cos(t), t * np.sin(t)], 1), atol=1e-3)
    # Seed 004's mixture, standardized: mean 0, std 1 per coordinate.
    g = toy_data.get("gaussians2d").sample(0, 60000)
    np.testing.assert_allclose(g.mean(0), 0, atol=0.02)
    np.testing.assert_allclose(g.std(0), 1, atol=0.02)


def test_toy_datasets_fresh_stream_and_fixed_sets():
    fresh = make({"source": "toy", "name": "mixture1d"}, batch=64, devices=2)
    assert fresh.num_examples is None and fresh.data_shape == (1,) and fresh.log_prob is not None
    assert fresh.get_batch(0)["x"].shape == (2, 32, 1) and set(fresh.get_batch(0)) == {"x", "label"}  # components
    assert not np.array_equal(fresh.get_batch(0)["x"], fresh.get_batch(1)["x"])
    fixed = make({"source": "toy", "name": "mixture1d", "num_points": 1000}, batch=100)
    assert fixed.num_examples == 1000
    pool = set(all_examples(fixed, 100)[0].ravel().tolist())
    assert len(pool) == 1000 and set(fixed.get_batch(17)["x"].ravel().tolist()) <= pool
    other_seed = make({"source": "toy", "name": "mixture1d", "num_points": 1000}, batch=100, seed=3)
    assert set(all_examples(other_seed, 100)[0].ravel().tolist()) == pool  # the fixed set ignores the seed
    test = make({"source": "toy", "name": "mixture1d", "num_test": 500}, split="test", batch=100)
    assert test.num_examples == 500 and not set(all_examples(test, 100)[0].ravel().tolist()) & pool


# ---------------------------------------------------------------------------
# Image folders with unreadable files (issue 19).
# ---------------------------------------------------------------------------


def _folder_config(path, **changes):
    cfg = data.default_config()
    cfg.update(dict(dict(source="folder", path=path, image_size=8, num_test=2), **changes))
    return cfg


def test_folder_with_bad_files_stops_before_training_naming_them(tmp_path):
    from tests.conftest import make_image_folder

    folder, broken = make_image_folder(tmp_path / "images")
    with pytest.raises(ValueError) as e:
        data.build_dataset(_folder_config(folder), split="train", global_batch_size=2, seed=0)
    message = str(e.value)
    assert message.startswith("config.data.path") and "skip_bad_files" in message
    assert all(name in message for name in broken) and "README.txt" not in message
    assert "3 of 13 files" in message


def test_folder_skip_bad_files_warns_once_and_trains_on_the_rest(tmp_path, caplog):
    from tests.conftest import make_image_folder

    folder, broken = make_image_folder(tmp_path / "images")
    cfg = _folder_config(folder, skip_bad_files=True)
    with caplog.at_level("WARNING"):
        train_ds = data.build_dataset(cfg, split="train", global_batch_size=2, seed=0)
        test_ds = data.build_dataset(cfg, split="test", global_batch_size=2, seed=0)
    warnings = [r for r in caplog.records if "not readable images" in r.getMessage()]
    assert len(warnings) == 1 and all(name in warnings[0].getMessage() for name in broken)
    assert train_ds.num_examples + test_ds.num_examples == 10
    x = np.concatenate([train_ds.get_batch(i)["x"].reshape(-1, 8, 8, 3) for i in range(4)])
    assert x.shape == (8, 8, 8, 3) and np.all(np.abs(x) <= 1.0)


def test_folder_file_going_bad_mid_run_is_skipped_and_logged(tmp_path, caplog):
    from tests.conftest import make_image_folder

    folder, _ = make_image_folder(tmp_path / "images")
    ds = data.build_dataset(_folder_config(folder, skip_bad_files=True, num_test=0), split="train",
                            global_batch_size=10, seed=0)
    before = ds.get_batch(0)["x"].reshape(10, -1)
    victim = ds._examples.files[ds._permutation(0)[0]]
    with open(victim, "wb") as f:
        f.write(b"overwritten")
    with caplog.at_level("WARNING"):
        after = ds.get_batch(0)["x"].reshape(10, -1)
    logged = [r.getMessage() for r in caplog.records if "became unreadable" in r.getMessage()]
    assert len(logged) == 1 and str(victim) in logged[0]
    # the broken file's slot holds another readable image of the folder; the rest are unchanged
    np.testing.assert_array_equal(after[1:], before[1:])
    assert any(np.array_equal(after[0], row) for row in before[1:])
