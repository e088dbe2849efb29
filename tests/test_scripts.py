"""Smoke tests of scripts/sample.py, evaluate.py and ablate.py on a tiny digits model.

One tiny run is trained in-process (module fixture); the scripts run as
subprocesses, as a user runs them.
"""
import csv
import itertools
import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"model.ch": 8, "model.ch_mult": (1,), "model.num_res_blocks": 1, "model.attn_resolutions": (),
        "model.num_groups": 4, "diffusion.T": 20, "train.num_steps": 10, "train.batch_size": 16,
        "train.steps_per_call": 5, "train.log_every": 5, "train.checkpoint_every": 10, "eval.every": 10,
        "eval.batch_size": 64, "eval.num_batches": 1, "eval.elbo_samples": 2, "eval.elbo_chunk": 20,
        "sample.num_samples": 0}


def _flag_value(v):
    return str(v).replace(" ", "")


TINY_FLAGS = [f"--config.{k}={_flag_value(v)}" for k, v in TINY.items() if k != "train.num_steps"]


def _run(script, *args, devices: int = 1):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(devices)}
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def digits_workdir(tmp_path_factory):
    from configs import digits
    from vdm import train

    config = digits.get_config()
    for path, value in TINY.items():
        section, field = path.split(".")
        config[section][field] = value
    # Class-conditional (configs/digits_conditional.py), so the scripts' label and guidance flags run too.
    config.data.conditional, config.train.label_dropout = True, 0.2
    workdir = str(tmp_path_factory.mktemp("digits"))
    train.train_and_evaluate(config, workdir)
    return workdir


def test_sample_writes_samples_grid_and_gif(digits_workdir, tmp_path):
    import numpy as np
    from PIL import Image

    args = [f"--workdir={digits_workdir}", "--sampler=ddim", "--num_steps=5", "--num_samples=6", "--frames=3",
            "--eta=0.0"]
    r = _run("sample.py", *args, f"--out={tmp_path / 'a'}")
    assert r.returncode == 0, r.stderr[-3000:]
    out = np.load(tmp_path / "a" / "samples.npz")
    samples = out["samples"]
    assert samples.shape == (6, 8, 8, 1) and int(out["checkpoint_step"]) == 10
    assert np.all(np.abs(samples) <= 1.0)  # x0 clipped for images by default; DDIM ends on its x0
    assert 1 <= len(out["traj_x"]) <= 3
    np.testing.assert_array_equal(out["traj_x"][-1], samples)  # the last record is the result
    from vdm import viz  # one GIF frame per record, but Pillow merges identical consecutive frames
    grids = [np.concatenate([viz.image_grid(a), viz.image_grid(b)], axis=1)
             for a, b in zip(out["traj_x"], out["traj_x0"])]
    with Image.open(tmp_path / "a" / "denoise.gif") as gif:
        assert gif.n_frames == 1 + sum(not np.array_equal(g, h) for g, h in zip(grids, grids[1:]))
    assert Image.open(tmp_path / "a" / "grid.png").size[0] >= 32
    # Same seed, same samples, also when sample.py spreads them over 2 devices.
    r = _run("sample.py", *args, f"--out={tmp_path / 'b'}", devices=2)
    assert r.returncode == 0 and "6 samples with ddim, 5 steps, on 2 devices" in r.stdout, r.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "b" / "samples.npz")["samples"], samples, atol=1e-6)
    # The raw parameters of step 10, another seed, stochastic DDIM on leading steps, no clipping;
    # 2 samples of every class at classifier-free guidance scale 1.5, one grid row per class.
    r = _run("sample.py", *args, "--step=10", "--raw_params", "--seed=1", "--spacing=leading", "--clip_x0=false",
             "--option=eta=1.0", "--label=all", "--num_samples=2", "--guidance_scale=1.5",
             f"--out={tmp_path / 'c'}", devices=2)
    assert r.returncode == 0, r.stderr[-3000:]
    other = np.load(tmp_path / "c" / "samples.npz")
    assert other["samples"].shape == (20,) + samples.shape[1:] and float(other["guidance_scale"]) == 1.5
    np.testing.assert_array_equal(other["labels"], np.repeat(np.arange(10), 2))
    assert Image.open(tmp_path / "c" / "grid.png").size[1] > 4 * Image.open(tmp_path / "a" / "grid.png").size[1]


def test_evaluate_exact_and_mc_and_sample_metrics(digits_workdir):
    out = os.path.join(digits_workdir, "eval.json")
    r = _run("evaluate.py", f"--workdir={digits_workdir}", "--elbo=exact,mc", "--num_samples=4",
             "--max_batches=1", "--sample_metrics", "--num_generated=32", "--classifier_steps=20",
             "--guidance_scale=0,2", f"--out={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.load(open(out))
    exact, mc = res["elbo"]["exact"], res["elbo"]["mc"]
    assert exact["unit"] == "bits/dim" and exact["num_examples"] == 64
    terms = exact["terms"]
    # The exact bound is the sum of its prior, diffusion and decoder terms (per example, so in the mean).
    parts = terms["prior"]["mean"] + terms["diffusion"]["mean"] + terms["decoder"]["mean"]
    assert parts == pytest.approx(terms["total"]["mean"], rel=1e-5)
    # Same examples, unbiased MC estimate of the same bound: agreement within a few standard errors.
    assert abs(res["exact_minus_mc"]["mean"]) < 5 * mc["terms"]["total"]["stderr"] + 1e-3
    assert res["samples"][0]["classifier_fd"] > 0
    assert "FID skipped" in r.stdout and "total" in r.stdout
    # The conditional bound -log p(x | y), and accuracy at the requested label and FD against w.
    assert "-log p(x | y)" in exact["method"]
    rows = res["guidance"]["rows"]
    assert [row["guidance_scale"] for row in rows] == [0.0, 2.0] and all(row["num_samples"] == 32 for row in rows)
    for row in rows:
        assert 0 <= row["accuracy"] <= 1 and row["classifier_fd"] > 0
        assert row["accuracy_stderr"] == pytest.approx(math.sqrt(row["accuracy"] * (1 - row["accuracy"]) / 32))
    assert os.path.exists(os.path.join(digits_workdir, "guidance.png"))


def test_evaluate_split_checkpoint_and_sampler_flags(digits_workdir, tmp_path):
    """The raw parameters of a given step on the train split, batch size, chunk and seed given,
    and stochastic DDIM samples: the JSON records what was asked for."""
    out = str(tmp_path / "eval.json")
    r = _run("evaluate.py", f"--workdir={digits_workdir}", "--split=train", "--batch_size=32", "--max_batches=1",
             "--elbo=exact", "--chunk=10", "--step=10", "--raw_params", "--seed=3", "--sample_metrics",
             "--sampler=ddim", "--eta=0.5", "--sampling_steps=5", "--num_generated=8", "--classifier_steps=5",
             f"--out={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.load(open(out))
    assert (res["split"], res["checkpoint_step"], res["params"]) == ("train", 10, "raw")
    assert res["elbo"]["exact"]["num_examples"] == 32
    assert res["samples"][0]["sampler"] == "ddim" and res["samples"][0]["steps"] == 5


def test_sampler_accuracy_prints_the_monte_carlo_floor():
    r = _run("sampler_accuracy.py", "--n=200", "--dims", "1", "--only=no such row")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "1-D mixture, N=200" in r.stdout and "exact samples (MC floor)" in r.stdout


def test_evaluate_ode_likelihood_and_pixel_baseline(digits_workdir):
    """--elbo=ode reports a dequantized bound on the 8-bit scale beside the per-pixel baseline."""
    out = os.path.join(digits_workdir, "eval_ode.json")
    r = _run("evaluate.py", f"--workdir={digits_workdir}", "--elbo=ode", "--ode_steps=3", "--ode_probes=2",
             "--max_batches=1", f"--out={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.load(open(out))
    ode = res["elbo"]["ode"]
    assert "8-bit scale" in ode["unit"] and ode["quantity"] == "negative log-likelihood"
    assert "3 Heun steps" in ode["method"] and "2 Rademacher probes" in ode["method"]
    total = ode["terms"]["total"]
    assert math.isfinite(total["mean"]) and total["stderr"] > 0
    base = res["pixel_baseline"]
    assert base["num_train"] == 1500 and 0 < base["mean"] < 8
    assert "per-pixel categorical baseline" in r.stdout


@pytest.mark.parametrize("override, named", [("--config.loss.weighting=bogus", "config.loss.weighting"),
                                             ("--config.loss.nofield=1", "--config.loss.nofield"),
                                             ("--config.train.batch_size=abc", "--config.train.batch_size")])
def test_train_config_error_is_one_line_with_exit_code_2(tmp_path, override, named):
    """A bad override (a refused value, no such field, a wrong type) stops before anything runs with
    one line naming the field and exit status 2: no traceback, no TensorFlow start-up lines."""
    r = _run("train.py", f"--workdir={tmp_path}", override)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("train.py: error: ") and named in lines[0], lines[0]


def test_evaluate_rejects_bad_flags(digits_workdir):
    r = _run("evaluate.py", f"--workdir={digits_workdir}", "--elbo=exactly")
    assert r.returncode != 0 and "--elbo='exactly'" in r.stderr
    r = _run("evaluate.py", f"--workdir={digits_workdir}", "--sample_metrics", "--inception_weights=/no/file.npz")
    assert r.returncode != 0 and "does not exist" in r.stderr and "pytorch-fid" in r.stderr


def test_ablate_grid_table_and_skip(tmp_path):
    workdir = str(tmp_path / "ablation")
    args = ["--config=configs/digits.py", f"--workdir={workdir}", "--grid=parameterization=eps,v",
            "--steps=5", "--elbo=exact,mc", "--num_generated=8", "--parallel=2", "--eval_flag=--max_batches=1",
            "--eval_flag=--num_samples=2", "--eval_flag=--classifier_steps=5", *TINY_FLAGS]
    r = _run("ablate.py", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader(open(os.path.join(workdir, "results.csv"))))
    assert [row["parameterization"] for row in rows] == ["eps", "v"]
    for row in rows:
        exact, mc, mc_se = (float(row[k]) for k in ("nelbo_bpd_exact", "nelbo_bpd_mc", "nelbo_bpd_mc_se"))
        assert exact > 0 and float(row["steps_per_s"]) > 0
        assert abs(exact - mc) < 5 * mc_se + 1e-3  # the same bound, two estimates on the same scans
        cfg = json.load(open(os.path.join(workdir, row["name"], "config.json")))
        assert cfg["diffusion"]["parameterization"] == row["parameterization"]
        assert cfg["train"]["num_steps"] == 5 and cfg["model"]["ch"] == 8
    assert os.path.getsize(os.path.join(workdir, "results.png")) > 0
    again = _run("ablate.py", *args)
    assert again.returncode == 0 and "2 already finished" in again.stdout


def test_ablate_validates_every_run_before_training(tmp_path):
    r = _run("ablate.py", "--config=configs/digits.py", f"--workdir={tmp_path}",
             "--grid=diffusion.parameterization=eps,noise", "--steps=10")
    assert r.returncode != 0 and "config.diffusion.parameterization" in r.stderr
    assert not os.listdir(tmp_path)
    r = _run("ablate.py", "--config=configs/digits.py", f"--workdir={tmp_path}", "--grid=model.depthh=1,2")
    assert r.returncode != 0 and "no field 'model.depthh'" in r.stderr
    r = _run("ablate.py", "--config=configs/digits.py", f"--workdir={tmp_path}", "--elbo=exact",
             "--config.diffusion.time=continuous", "--config.diffusion.schedule=vdm_linear",
             "--config.loss.name=vdm", "--config.diffusion.time_input=log_snr", "--config.diffusion.T=0",
             "--config.sample.num_steps=10")
    assert r.returncode != 0 and "--elbo=exact needs discrete time" in r.stderr
    assert not os.listdir(tmp_path)


# ---------------------------------------------------------------------------
# Data the shipped scripts crashed on (issue 19): vector data from an .npz with more than
# 2 dimensions, and unlabelled images (no sample metric to plot).
# ---------------------------------------------------------------------------


def _train_tiny(workdir, data_changes, model):
    from vdm import config as config_lib
    from vdm import train

    c = config_lib.defaults()
    c.data.update(data_changes)
    c.model = model
    c.diffusion.T = 20
    c.train.update(dict(num_steps=2, batch_size=4, log_every=1, checkpoint_every=2))
    c.eval.update(dict(every=2, batch_size=4, num_batches=1, elbo_samples=2, elbo_chunk=20))
    c.sample.update(dict(num_samples=4))
    train.train_and_evaluate(c, workdir)
    return workdir


def test_vector_npz_data_samples_and_sample_metrics(tmp_path):
    """3-D float vectors from an .npz: the loop writes its samples (as .npz, no plot), sample.py
    runs, and evaluate.py --sample_metrics compares with the held-out vectors."""
    import numpy as np

    path = tmp_path / "vectors.npz"
    np.savez(path, x=np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32))
    model = dict(name="mlp", hidden=16, depth=1, embed_dim=8, dtype="float32")
    workdir = _train_tiny(str(tmp_path / "run"), dict(source="npz", path=str(path), num_test=8), model)
    assert os.listdir(os.path.join(workdir, "samples")) == ["step_0000002.npz"]
    r = _run("sample.py", f"--workdir={workdir}", "--num_samples=5", "--num_steps=4", f"--out={tmp_path / 's'}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert np.load(tmp_path / "s" / "samples.npz")["samples"].shape == (5, 3) and "no plot" in r.stdout
    out = str(tmp_path / "eval.json")
    r = _run("evaluate.py", f"--workdir={workdir}", "--elbo=none", "--sample_metrics", "--num_generated=8",
             "--sampling_steps=4", f"--out={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    row = json.load(open(out))["samples"][0]
    assert row["mmd"] == row["mmd"] and row["sliced_wasserstein"] > 0


def test_evaluate_several_sampler_rows_on_unlabelled_images(tmp_path):
    """Unlabelled images without --inception_weights have no sample metric: the rows are
    reported and the comparison plot is skipped with a reason."""
    import numpy as np

    path = tmp_path / "images.npz"
    np.savez(path, x=np.random.default_rng(0).integers(0, 256, (20, 4, 4, 1)).astype(np.uint8))
    model = dict(name="unet", ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_groups=4,
                 dtype="float32")
    workdir = _train_tiny(str(tmp_path / "run"), dict(source="npz", path=str(path), num_test=4), model)
    out = str(tmp_path / "eval.json")
    r = _run("evaluate.py", f"--workdir={workdir}", "--elbo=none", "--sample_metrics", "--num_generated=4",
             "--sampler=ancestral,ddim", "--sampling_steps=2,4", f"--out={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(json.load(open(out))["samples"]) == 4 and "sample_quality.png skipped" in r.stdout


def test_ablate_docstring_examples_validate():
    """Every run of the examples in ablate.py's docstring passes validation."""
    import shlex

    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import ablate
    from configs import digits

    doc = ablate.__doc__.replace("\\\n", " ")
    commands = [shlex.split(line) for line in doc.splitlines() if "scripts/ablate.py" in line]
    assert len(commands) == 3
    for cmd in commands:
        config = digits.get_config()
        grids = [a.split("=", 1)[1] for a in cmd if a.startswith("--grid=")] or ["parameterization"]
        overrides = {}
        for a in cmd:
            if a.startswith("--config."):
                key, value = a[len("--config."):].split("=", 1)
                overrides[key] = ablate.parse_value(value, ablate.get_field(config, key))
        axes = ablate.parse_axes(config, grids)
        for values in itertools.product(*(vals for _, vals in axes)):
            point = dict(overrides)
            for (fields, _), linked in zip(axes, values):  # an axis links one or more fields
                point.update(zip(fields, linked))
            ablate.run_config(config, point)


def test_ablate_splits_tuple_values_and_links_fields():
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import ablate
    from configs import digits_vdm_ablation

    assert ablate.split_values("(1,2,3),(6, 7),()") == ["(1,2,3)", "(6, 7)", "()"]
    assert ablate.split_values("eps,v") == ["eps", "v"]
    config = digits_vdm_ablation.get_config()
    axes = ablate.parse_axes(config, ["model.fourier_exponents=(1,2),()", "loss.name=vdm,simple;diffusion.T=0,10"])
    assert axes == [(("model.fourier_exponents",), [((1, 2),), ((),)]),
                    (("loss.name", "diffusion.T"), [("vdm", 0), ("simple", 10)])]
    with pytest.raises(Exception, match="same number of values"):
        ablate.parse_axes(config, ["loss.name=vdm,simple;diffusion.T=0"])
