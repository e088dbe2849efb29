"""vdm.prefetch and the data workers: the queue and the threads change when a batch is made,
never which batch, and leave no thread behind."""
import threading
import time

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from vdm import data, prefetch


def _threads(prefix):
    return [t for t in threading.enumerate() if t.name.startswith(prefix)]


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetcher_yields_every_key_in_order(depth):
    made = []

    def produce(key):
        made.append(key)
        return key * key

    with prefetch.Prefetcher(produce, range(0, 12, 2), depth) as ahead:
        assert list(ahead) == [(k, k * k) for k in range(0, 12, 2)]
        assert list(ahead) == []
    assert made == list(range(0, 12, 2)) and not _threads("vdm-prefetch")


def test_prefetcher_stays_at_most_depth_ahead_and_close_stops_the_thread():
    made = []

    def produce(key):
        made.append(key)
        return key

    ahead = prefetch.Prefetcher(produce, range(100), depth=2)
    assert next(ahead) == (0, 0)
    for _ in range(100):  # the thread fills the queue (2 items) and makes one more, then waits
        if len(made) == 4:
            break
        time.sleep(0.01)
    time.sleep(0.05)
    assert made == [0, 1, 2, 3]
    ahead.close()
    assert not _threads("vdm-prefetch") and made == [0, 1, 2, 3]
    with pytest.raises(StopIteration):
        next(ahead)


def test_prefetcher_raises_the_producers_error_in_the_caller():
    def produce(key):
        if key == 2:
            raise OSError(f"cannot read batch {key}")
        return key

    ahead = prefetch.Prefetcher(produce, range(5), depth=2)
    assert [next(ahead), next(ahead)] == [(0, 0), (1, 1)]
    with pytest.raises(OSError, match="cannot read batch 2"):
        next(ahead)
    ahead.close()
    assert not _threads("vdm-prefetch")
    with pytest.raises(ValueError, match="depth must be an integer >= 0"):
        prefetch.Prefetcher(produce, range(5), depth=-1)


def _dataset(overrides, workers, batch):
    cfg = ml_collections.ConfigDict({**data.default_config().to_dict(), **overrides, "workers": workers})
    return data.build_dataset(cfg, split="train", global_batch_size=batch, seed=3, process_index=0,
                              process_count=1, local_device_count=2)


def test_batches_do_not_depend_on_the_number_of_workers(tmp_path):
    """Image folder (flips, dequantization, padding), TFDS and digits: the batch of a step is
    the same with 1, 2 and 3 decoding threads; close() ends the threads."""
    from tests.conftest import make_image_folder

    folder, _ = make_image_folder(tmp_path / "images")
    sources = {
        "folder": (dict(source="folder", path=folder, image_size=8, pad_to=10, num_test=2, skip_bad_files=True,
                        random_flip=True, dequantize=True), 6),
        "tfds": (dict(source="tfds", name="mnist", image_size=12, random_flip=True), 6),
        "digits": (dict(random_flip=True), 10),
    }
    with tfds.testing.mock_data(num_examples=20):
        for name, (overrides, batch) in sources.items():
            one = _dataset(overrides, 1, batch)
            expected = [one.get_batch(step) for step in (0, 1, 5)]
            for workers in (2, 3):
                ds = _dataset(overrides, workers, batch)
                for step, want in zip((0, 1, 5), expected):
                    got = ds.get_batch(step)
                    assert got.keys() == want.keys()
                    for key in want:
                        np.testing.assert_array_equal(got[key], want[key], err_msg=f"{name} {workers} {key}")
                assert _threads("vdm-decode")  # every source here is 8-bit images, loaded in chunks
                ds.close()
                assert not _threads("vdm-decode")


def test_workers_field_is_validated():
    with pytest.raises(ValueError, match="config.data.workers: must be a non-negative int"):
        data.validate_config({"workers": -1})
