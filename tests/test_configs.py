"""Config-matrix smoke suite: every path a config can reach trains, evaluates and samples,
or is refused by ``config.validate`` with a message naming the field.

* Every file in configs/ runs with the generic tiny override of tests/config_worker.py
  (TFDS through ``tfds.testing.mock_data``, the folder config on a temporary folder of
  PNG/JPEG files with sub-folders and broken files): 2 train steps, a checkpoint, an
  evaluation and a sample grid, then a resume to step 4.
* A pairwise-covering matrix (``pairwise_rows``) over the options below: every pair of
  values of two factors that some valid config holds appears in a row that runs (2 steps,
  checkpoint, evaluation, samples); every pair no valid row was found for appears in a row
  that validation must refuse, naming the field. Never an exception from inside the loop.

All runs go through two worker processes (compiles at a low XLA optimisation level).
"""
import functools
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from tests import config_worker
from tests.conftest import make_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(n for n in os.listdir(os.path.join(ROOT, "configs")) if n.endswith(".py"))

# time/schedule pairs: a schedule name means different functions in the two times.
FACTORS = {
    "parameterization": ("eps", "x0", "v", "score"),
    "variance": ("fixed_small", "fixed_large", "learned_range", "learned"),
    "loss": ("simple", "hybrid", "vlb", "vdm"),
    "process": ("discrete/linear", "discrete/cosine", "continuous/cosine",
                "continuous/vdm_linear", "continuous/learned"),
    "sampler": ("ancestral", "ddim", "langevin", "pc", "ode"),
    "spacing": ("linspace", "leading", "trailing", "quadratic", "karras"),
    "accum_steps": (1, 2),
    "steps_per_call": (1, 2),
    "dtype": ("float32", "bfloat16"),
    "dequantize": (False, True),
    "random_flip": (False, True),
}


def matrix_overrides(row: dict) -> dict:
    """Config overrides of a matrix row: 8x8 digits with the tiny UNet when the row
    dequantizes or flips (8-bit image options), else the 2-D toy data with the tiny MLP."""
    time, schedule = row["process"].split("/")
    images = row["dequantize"] or row["random_flip"]
    o = {"diffusion.parameterization": row["parameterization"], "diffusion.variance": row["variance"],
         "diffusion.time": time, "diffusion.schedule": schedule, "loss.name": row["loss"],
         "sample.sampler": row["sampler"], "sample.spacing": row["spacing"],
         "optim.accum_steps": row["accum_steps"], "train.steps_per_call": row["steps_per_call"],
         "train.log_every": row["steps_per_call"], "model.dtype": row["dtype"],
         "data.dequantize": row["dequantize"], "data.random_flip": row["random_flip"]}
    if time == "continuous":
        o.update({"diffusion.T": 0, "sample.num_steps": 5})
    else:  # T = 50: the smallest T for which the linear schedule's 1000/T rescaling keeps betas < 1
        one_step = row["variance"] == "learned" and row["sampler"] in ("ancestral", "pc")
        o.update({"diffusion.T": 50, "eval.elbo_chunk": 50, "sample.num_steps": 0 if one_step else 5})
    if schedule == "learned":
        o["diffusion.time_input"] = "log_snr"
    if not images:
        o.update({"data.source": "toy", "data.name": "gaussians2d", "data.num_test": 8, "model.name": "mlp",
                  "model.hidden": 16, "model.depth": 1, "model.embed_dim": 8, "sample.clip_x0": False})
        for field in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "num_heads",
                      "num_groups", "zero_init_output"):
            o[f"model.{field}"] = None  # removed below
    return o


def matrix_config(row: dict):
    config = config_worker.tiny(config_worker.load_config("default.py"))
    o = matrix_overrides(row)
    for path, value in o.items():
        section, field = path.split(".")
        if value is None:
            del config[section][field]
        else:
            config[section][field] = value
    return config


@functools.lru_cache(maxsize=None)
def _valid_values(values: tuple) -> bool:
    from vdm import config as config_lib

    try:
        config_lib.validate(matrix_config(dict(zip(FACTORS, values))))
    except ValueError:
        return False
    return True


def _valid(row: dict) -> bool:
    return _valid_values(tuple(row.values()))


def repair(row: dict, fixed: set, rng) -> dict:
    """Change the factors not in ``fixed`` that make a random row invalid for a known reason
    (continuous time trains the VDM loss with a fixed variance; the simple loss does not
    train a variance), so most candidates run."""
    free = lambda n: n not in fixed
    continuous = row["process"].startswith("continuous")
    if continuous:
        if free("loss"):
            row["loss"] = "vdm"
        if free("variance"):
            row["variance"] = rng.choice(("fixed_small", "fixed_large"))
        if free("spacing"):
            row["spacing"] = rng.choice(("linspace", "karras"))
    elif row["loss"] == "vdm" and free("loss"):
        row["loss"] = rng.choice(("simple", "hybrid", "vlb"))
    if row["loss"] == "simple" and row["variance"].startswith("learned"):
        if free("variance"):
            row["variance"] = rng.choice(("fixed_small", "fixed_large"))
        elif free("loss") and not continuous:
            row["loss"] = rng.choice(("hybrid", "vlb"))
    return row


def _pairs(row: dict):
    names = list(FACTORS)
    return {(a, row[a], b, row[b]) for i, a in enumerate(names) for b in names[i + 1:]}


IMAGE_OPTIONS = ("dequantize", "random_flip")


def _greedy(uncovered: set, completion, candidates: int, tries: int, rng):
    """(running rows, refused rows) covering ``uncovered`` (AETG-style): each new row is the valid
    candidate, among ``candidates`` completions of uncovered pairs, covering the most uncovered
    pairs; a pair with no valid completion in ``tries`` draws gets a row of its own, which
    validation must refuse."""
    rows, refused = [], []
    while uncovered:
        best, gain = None, 0
        for pair in rng.sample(sorted(uncovered, key=repr), min(candidates, len(uncovered))):
            row = completion(pair)
            g = len(_pairs(row) & uncovered)
            if g > gain and _valid(row):
                best, gain = row, g
        if best is not None:
            rows.append(best)
            uncovered -= _pairs(best)
            continue
        pair = min(uncovered, key=repr)
        for _ in range(tries):
            row = completion(pair)
            if _valid(row):
                rows.append(row)
                uncovered -= _pairs(row)
                break
        else:
            refused.append(row)
            uncovered -= {pair}
    return rows, refused


def pairwise_rows(seed: int = 0, candidates: int = 150, tries: int = 50):
    """(running rows, refused rows) covering every pair of values of two factors. The image
    options (``IMAGE_OPTIONS``: only 8-bit images have them, and image rows compile a UNet) are
    covered last, by rows that turn both on unless their pair says otherwise: the other pairs
    are covered by toy-data rows first."""
    rng = random.Random(seed)
    names = list(FACTORS)
    pairs = {(a, va, b, vb) for i, a in enumerate(names) for b in names[i + 1:]
             for va in FACTORS[a] for vb in FACTORS[b]}

    def completion(pair, images):
        a, va, b, vb = pair
        row = {n: rng.choice(v) for n, v in FACTORS.items()}
        row.update({n: images for n in IMAGE_OPTIONS})
        row[a], row[b] = va, vb
        return repair(row, {a, b}, rng)

    toy_pairs = {p for p in pairs if not (p[0] in IMAGE_OPTIONS and p[1]) and not (p[2] in IMAGE_OPTIONS and p[3])}
    rows, refused = _greedy(toy_pairs, lambda p: completion(p, False), candidates, tries, rng)
    rest = pairs - set().union(*(_pairs(r) for r in rows + refused))
    more, more_refused = _greedy(rest, lambda p: completion(p, True), candidates, tries, rng)
    return rows + more, refused + more_refused


def _row_name(row):
    return "-".join(str(v).replace("/", ":") for v in row.values())


RUNNING, REFUSED = pairwise_rows()
WORKERS = 2
# The continuous vp_linear schedule with the VDM loss, outside the matrix: it trained on NaN while
# its log-SNR was infinite at t = 0; it now starts at score_sde's t_min = 1e-5 and must train.
VP_LINEAR = dict(zip(FACTORS, ("eps", "fixed_small", "vdm", "continuous/vp_linear", "ancestral", "linspace",
                               1, 1, "float32", False, False)))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("configs")
    folder, _ = make_image_folder(root / "images")
    runs = []
    for name in CONFIG_FILES:
        overrides = {"data.path": folder, "data.skip_bad_files": True} if name == "image_folder.py" else {}
        runs.append({"name": name, "config": name, "overrides": overrides, "resume": True})
    for row in RUNNING + REFUSED + [VP_LINEAR]:
        overrides = {k: v for k, v in matrix_overrides(row).items() if v is not None}
        runs.append({"name": _row_name(row), "config": "matrix", "overrides": overrides, "resume": False,
                     "delete": [k for k, v in matrix_overrides(row).items() if v is None]})
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    procs = []
    for i in range(WORKERS):  # compiles are single-threaded: one worker per core
        with open(root / f"runs_{i}.json", "w") as f:
            json.dump(runs[i::WORKERS], f)
        procs.append(subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "config_worker.py"),
                                       str(root / f"runs_{i}.json"), str(root / f"results_{i}.json"),
                                       str(root / "work")], env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    results = {}
    for i, proc in enumerate(procs):
        err = proc.communicate(timeout=3600)[1]
        assert proc.returncode == 0, err[-3000:]
        with open(root / f"results_{i}.json") as f:
            results.update(json.load(f))
    return results


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_config_file_trains_resumes_evaluates_samples(results, name):
    r = results[name]
    assert r["status"] == "ok", r.get("message")
    assert r["resumed_from"] == 2 and r["checkpoints"][-1] == 4, r
    assert any(s.startswith("step_0000002") for s in r["samples"]), r["samples"]
    assert any(s.startswith("step_0000004") for s in r["samples"]), r["samples"]
    assert len(r["eval_bpd"]) == 2 and np.all(np.isfinite(r["eval_bpd"])), r["eval_bpd"]


@pytest.mark.parametrize("row", RUNNING, ids=_row_name)
def test_matrix_row_runs(results, row):
    r = results[_row_name(row)]
    assert r["status"] == "ok", r.get("message")
    assert r["checkpoints"] == [2] and any(s.startswith("step_0000002") for s in r["samples"]), r
    assert np.all(np.isfinite(r["eval_bpd"])), r


@pytest.mark.parametrize("row", REFUSED, ids=_row_name)
def test_matrix_row_refused_naming_the_field(results, row):
    r = results[_row_name(row)]
    assert r["status"] == "refused", r
    assert r["message"].startswith("config."), r["message"]


def test_vp_linear_with_the_vdm_loss_trains(results):
    r = results[_row_name(VP_LINEAR)]
    assert r["status"] == "ok", r.get("message")
    assert np.all(np.isfinite(r["eval_bpd"])), r


def test_matrix_covers_every_pair():
    """Every pair of values of two factors is in a running row or in a refused row."""
    covered = set().union(*(_pairs(r) for r in RUNNING + REFUSED))
    names = list(FACTORS)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            for va in FACTORS[a]:
                for vb in FACTORS[b]:
                    assert (a, va, b, vb) in covered
