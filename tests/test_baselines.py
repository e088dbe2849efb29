"""The per-pixel categorical baseline: closed forms and the embedded digits' reference value."""
import math

import numpy as np
import pytest

from vdm import baselines, config, data, likelihood


def _images(rng, n, d=5):
    """8-bit images as data x = k / 127.5 - 1, pixels drawn from a few values per dimension."""
    k = rng.choice([0, 3, 128, 255], size=(n, d), p=[0.5, 0.2, 0.2, 0.1])
    return k, k / 127.5 - 1


def test_leave_one_out_likelihood_equals_refitting_without_each_image():
    rng = np.random.default_rng(0)
    k, x = _images(rng, 30)
    counts = baselines.pixel_counts([x])
    for alpha in (1e-3, 0.5):
        brute = 0.0
        for i in range(30):
            rest = baselines.pixel_counts([np.delete(x, i, axis=0)])
            brute += np.sum(np.log((rest[np.arange(5), k[i]] + alpha) / (29 + 256 * alpha)))
        np.testing.assert_allclose(baselines.leave_one_out_log_likelihood(counts, alpha), brute, rtol=1e-10)


def test_fit_is_a_normalized_add_alpha_model_and_bits_per_dim_is_its_mean_nll():
    rng = np.random.default_rng(1)
    k, x = _images(rng, 200)
    batches = [{"x": x[:150].reshape(3, 50, 5), "mask": np.ones((3, 50), bool)},  # device-sharded layout
               {"x": x[150:], "mask": np.arange(50) < 40}]                      # padded last batch
    model = baselines.fit(batches)
    assert model.num_train == 190 and model.alpha in baselines.ALPHAS
    np.testing.assert_allclose(np.exp(model.log_probs).sum(axis=1), 1.0, rtol=1e-12)
    counts = np.stack([np.bincount(k[:190, d], minlength=256) for d in range(5)])
    np.testing.assert_allclose(model.log_probs, np.log((counts + model.alpha) / (190 + 256 * model.alpha)))
    r = baselines.bits_per_dim(model, [x[:7]])
    per_image = -np.mean(model.log_probs[np.arange(5), k[:7]], axis=1) / math.log(2)
    np.testing.assert_allclose([r["mean"], r["stderr"]], [per_image.mean(), per_image.std(ddof=1) / math.sqrt(7)])
    # Dequantized pixels round back to their value.
    np.testing.assert_array_equal(baselines.to_8bit(x + 0.49 * 2 / 255), k)
    with pytest.raises(ValueError, match="alphas must be positive"):
        baselines.fit([x], alphas=(0.0,))


def test_uniform_pixels_cost_eight_bits_per_dim():
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (20000, 3)) / 127.5 - 1
    r = baselines.reference_bpd([x[:10000]], [x[10000:]])
    assert abs(r["mean"] - 8.0) < 0.05 and r["alpha"] >= 1.0  # heavy smoothing wins on uniform data


def test_embedded_digits_baseline_is_2_41_bits_per_dim():
    """Another engineer measured 2.41 bits/dim for this baseline on the embedded digits
    (1,500 train / 297 test)."""
    c = config.defaults()
    ds = {s: data.build_dataset(c.data, split=s, global_batch_size=100, seed=0) for s in ("train", "test")}
    r = baselines.reference_bpd(likelihood.epoch_batches(ds["train"], 100), likelihood.epoch_batches(ds["test"], 100))
    assert r["num_train"] == 1500 and r["num_examples"] == 297
    assert abs(r["mean"] - 2.41) < 0.01, r
