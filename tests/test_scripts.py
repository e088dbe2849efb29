"""Smoke tests of scripts/sample.py, evaluate.py and ablate.py on a tiny digits model.

One tiny run is trained in-process (module fixture); the scripts run as
subprocesses, as a user runs them.
"""
import csv
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"model.ch": 8, "model.ch_mult": (1,), "model.num_res_blocks": 1, "model.attn_resolutions": (),
        "model.num_groups": 4, "diffusion.T": 20, "train.num_steps": 10, "train.batch_size": 16,
        "train.steps_per_call": 5, "train.log_every": 5, "train.checkpoint_every": 10, "eval.every": 10,
        "eval.batch_size": 64, "eval.num_batches": 1, "eval.elbo_samples": 2, "eval.elbo_chunk": 20,
        "sample.num_samples": 0}


def _flag_value(v):
    return str(v).replace(" ", "")


TINY_FLAGS = [f"--config.{k}={_flag_value(v)}" for k, v in TINY.items() if k != "train.num_steps"]


def _run(script, *args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
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
    workdir = str(tmp_path_factory.mktemp("digits"))
    train.train_and_evaluate(config, workdir)
    return workdir


def test_sample_writes_samples_grid_and_gif(digits_workdir, tmp_path):
    import numpy as np
    from PIL import Image

    args = [f"--workdir={digits_workdir}", "--sampler=ddim", "--num_steps=5", "--num_samples=6", "--frames=3"]
    r = _run("sample.py", *args, f"--out={tmp_path / 'a'}")
    assert r.returncode == 0, r.stderr[-3000:]
    out = np.load(tmp_path / "a" / "samples.npz")
    samples = out["samples"]
    assert samples.shape == (6, 8, 8, 1) and int(out["checkpoint_step"]) == 10
    assert np.all(np.abs(samples) <= 1.0)  # x0 clipped for images by default; DDIM ends on its x0
    assert 1 <= len(out["traj_x"]) <= 3
    np.testing.assert_array_equal(out["traj_x"][-1], samples)  # the last record is the result
    with Image.open(tmp_path / "a" / "denoise.gif") as gif:
        assert gif.n_frames == len(out["traj_x"])
    assert Image.open(tmp_path / "a" / "grid.png").size[0] >= 32
    r = _run("sample.py", *args, f"--out={tmp_path / 'b'}")  # same seed, same samples
    np.testing.assert_array_equal(np.load(tmp_path / "b" / "samples.npz")["samples"], samples)


def test_evaluate_exact_and_mc_and_sample_metrics(digits_workdir):
    out = os.path.join(digits_workdir, "eval.json")
    r = _run("evaluate.py", f"--workdir={digits_workdir}", "--elbo=exact,mc", "--num_samples=4",
             "--max_batches=1", "--sample_metrics", "--num_generated=32", "--classifier_steps=20",
             f"--out={out}")
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


def test_evaluate_rejects_bad_flags(digits_workdir):
    r = _run("evaluate.py", f"--workdir={digits_workdir}", "--elbo=exactly")
    assert r.returncode != 0 and "--elbo='exactly'" in r.stderr
    r = _run("evaluate.py", f"--workdir={digits_workdir}", "--sample_metrics", "--inception_weights=/no/file.npz")
    assert r.returncode != 0 and "does not exist" in r.stderr and "pytorch-fid" in r.stderr


def test_ablate_grid_table_and_skip(tmp_path):
    workdir = str(tmp_path / "ablation")
    args = ["--config=configs/digits.py", f"--workdir={workdir}", "--grid=parameterization=eps,v",
            "--steps=5", "--elbo=exact,mc", "--num_generated=8", "--eval_flag=--max_batches=1",
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
             "--config.loss.name=vdm", "--config.diffusion.time_input=log_snr", "--config.diffusion.T=0")
    assert r.returncode != 0 and "--elbo=exact needs discrete time" in r.stderr
    assert not os.listdir(tmp_path)


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
