"""vdm.viz: every figure is written, has the right size / frames, and shows the given pixels."""
import json

import numpy as np
import pytest
from PIL import Image, ImageSequence

from vdm import viz


def _constant_images(values, h=6, w=5, c=1):
    return np.stack([np.full((h, w, c), v, np.float32) for v in values])


def test_image_grid_layout_and_pixel_values(tmp_path):
    values = np.linspace(-1, 1, 10)
    path = viz.save_image_grid(tmp_path / "sub" / "grid.png", _constant_images(values), nrow=4, pad=2)
    grid = np.asarray(Image.open(path))
    # 4 columns x 3 rows of 6x5 cells with 2-pixel padding.
    assert grid.shape == (2 + 3 * (6 + 2), 2 + 4 * (5 + 2))
    for i, v in enumerate(values):
        r, k = divmod(i, 4)
        cell = grid[2 + r * 8: 2 + r * 8 + 6, 2 + k * 7: 2 + k * 7 + 5]
        assert np.all(cell == np.round((v + 1) * 127.5))
    assert np.all(grid[:2] == 255)                   # padding is white
    assert np.all(grid[18:, 2 + 2 * 7:] == 255)      # empty cells too

    rgb = np.concatenate([_constant_images([-1, 1], c=1), _constant_images([1, -1], c=1),
                          _constant_images([0, 0], c=1)], axis=-1)
    grid = np.asarray(Image.open(viz.save_image_grid(tmp_path / "rgb.png", rgb)))
    assert grid.shape == (2 + 1 * 8, 2 + 2 * 7, 3)   # default nrow = ceil(sqrt(2)) = 2
    np.testing.assert_array_equal(grid[2, 2], [0, 255, 128])

    big = viz.image_grid(_constant_images(values), nrow=4, pad=2, scale=3)   # nearest-neighbour x3
    assert big.shape == (2 + 3 * (18 + 2), 2 + 4 * (15 + 2), 1)
    np.testing.assert_array_equal(big[2:20, 2:17], np.full((18, 15, 1), 0, np.uint8))


def test_image_grid_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
        viz.image_grid(np.zeros((4, 8, 8)))
    with pytest.raises(ValueError, match=r"C in \(1, 3\)"):
        viz.image_grid(np.zeros((4, 8, 8, 2)))


def test_denoising_gif_frames_show_both_trajectories(tmp_path):
    steps, n = 7, 4
    rng = np.random.default_rng(0)
    xt = np.clip(rng.standard_normal((steps, n, 6, 5, 1)), -1, 1)
    x0 = np.clip(rng.standard_normal((steps, n, 6, 5, 1)), -1, 1)
    path = viz.save_denoising_gif(tmp_path / "denoise.gif", xt, x0, max_frames=5)
    frames = [np.asarray(f.convert("L")) for f in ImageSequence.Iterator(Image.open(path))]
    left_w = viz.image_grid(xt[0]).shape[1]
    assert len(frames) == 5
    assert frames[0].shape == (viz.image_grid(xt[0]).shape[0], 2 * left_w + 8)
    # First frame: x_t at step 0 on the left; last frame: both at the final step, exactly.
    np.testing.assert_array_equal(frames[0][:, :left_w], viz.image_grid(xt[0])[..., 0])
    np.testing.assert_array_equal(frames[-1][:, :left_w], viz.image_grid(xt[-1])[..., 0])
    np.testing.assert_array_equal(frames[-1][:, -left_w:], viz.image_grid(x0[-1])[..., 0])

    rgb = np.clip(rng.standard_normal((3, 2, 4, 4, 3)), -1, 1)
    frames = list(ImageSequence.Iterator(Image.open(viz.save_denoising_gif(tmp_path / "rgb.gif", rgb, rgb))))
    assert len(frames) == 3
    with pytest.raises(ValueError, match="xt_traj and x0_traj"):
        viz.save_denoising_gif(tmp_path / "bad.gif", xt, x0[:3])


def _png_size(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_toy_plots_are_written(tmp_path):
    rng = np.random.default_rng(1)
    mix = np.where(rng.random(2000) < 1 / 3, -4.0, 4.0) + rng.standard_normal(2000)
    log_prob = lambda x: np.log(np.exp(-0.5 * (x[:, 0] + 4) ** 2) / 3
                                + 2 * np.exp(-0.5 * (x[:, 0] - 4) ** 2) / 3) - 0.5 * np.log(2 * np.pi)
    w, h = _png_size(viz.plot_1d_samples(tmp_path / "hist.png", mix[:, None], log_prob))
    assert w > 300 and h > 200
    pts = rng.standard_normal((500, 2))
    log_prob2 = lambda x: -0.5 * np.sum(x ** 2, -1) - np.log(2 * np.pi)
    assert min(_png_size(viz.plot_2d_samples(tmp_path / "s.png", pts, data=pts + 0.1, log_prob_fn=log_prob2))) > 200
    traj = np.cumsum(rng.standard_normal((50, 30, 1)), axis=0)
    assert min(_png_size(viz.plot_trajectories(tmp_path / "t.png", traj, modes=[-4, 4]))) > 200
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        viz.plot_2d_samples(tmp_path / "bad.png", mix)
    with pytest.raises(ValueError, match=r"\[S, N\]"):
        viz.plot_trajectories(tmp_path / "bad.png", np.zeros((3, 4, 2)))


def test_loss_curves_from_jsonl_and_dict(tmp_path):
    jsonl = tmp_path / "metrics.jsonl"
    with open(jsonl, "w") as f:
        for s in range(0, 200, 10):
            rec = {"step": s, "loss": 1.0 / (1 + s), "grad_norm": 2.0}
            if s % 50 == 0:
                rec["eval_bpd"] = 3.0 - s / 100
            f.write(json.dumps(rec) + "\n")
    assert viz._curves(str(jsonl))["eval_bpd"][0].tolist() == [0, 50, 100, 150]
    assert _png_size(viz.plot_loss_curves(tmp_path / "curves.png", jsonl))[0] > 500   # three panels
    assert _png_size(viz.plot_loss_curves(tmp_path / "d.png", {"loss": [3, 2, 1]}))[0] > 200
    with pytest.raises(ValueError, match="available metrics"):
        viz.plot_loss_curves(tmp_path / "x.png", jsonl, keys=["nope"])


def test_ablation_bars_and_lines(tmp_path):
    rows = [{"name": p, "loss": v, "bpd": b} for p, v, b in
            [("eps", 0.1, 1.2), ("x0", 0.2, 1.5), ("v", 0.12, float("nan")), ("score", 0.3, 2.0)]]
    assert _png_size(viz.plot_ablation(tmp_path / "bars.png", rows, ["loss", "bpd"]))[0] > 400
    lines = [{"sampler": s, "steps": k, "mmd": 1 / k} for s in ("ddpm", "ddim") for k in (10, 100, 1000)]
    assert _png_size(viz.plot_ablation(tmp_path / "lines.png", lines, ["mmd"], label="sampler", x="steps",
                                       log_x=True))[0] > 200
    with pytest.raises(ValueError, match="'steps'"):
        viz.plot_ablation(tmp_path / "bad.png", rows, ["loss"], x="steps")
