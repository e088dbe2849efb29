"""train.parallelism = "mesh" (vdm/parallel.py): the jitted step over a (data, fsdp) mesh equals
the pmapped one, FSDP shards what the rule says, sharded checkpoints resume on another device
count and fsdp size, and a mesh spanning 2 processes equals one process.

The runs go through tests/parallel_worker.py (8 forced CPU devices, in one process) and
tests/train_worker.py (fresh processes, each with its own device count).
"""
import math
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from tests.test_train import ENV, _assert_close, _assert_trained, _checkpoints, _cmd, _state, run_processes
from vdm import config as config_lib
from vdm import parallel

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "parallel_worker.py")
# 12 steps, a checkpoint every 2, and the vlb loss with importance-sampled t, whose loss history
# is in the state (replicated) beside the sharded params, EMA params and Adam moments.
RUN = ("train.parallelism='mesh'", "train.num_steps=12", "train.checkpoint_every=2", "train.keep_checkpoints=3",
       "loss.name='vlb'", "loss.importance_sampling=True", "loss.history=2")
TOL = 1e-5


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    """(mesh-vs-pmap records, final state of an uninterrupted mesh run on 8 devices at fsdp 8)."""
    out = tmp_path_factory.mktemp("parallel")
    proc = subprocess.run([sys.executable, WORKER, str(out), *RUN, "train.fsdp=8"], env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import json

    with open(out / "compare.json") as f:
        records = json.load(f)
    assert "parallelism mesh (mesh {'data': 1, 'fsdp': 8})" in proc.stdout
    return records, _state(out / "straight")


def test_fsdp_rule_splits_the_largest_divisible_dimension():
    P = parallel.P
    assert parallel.fsdp_spec((3, 3, 64, 128), 8, 1024) == P(None, None, None, "fsdp")
    assert parallel.fsdp_spec((256, 128), 8, 1024) == P("fsdp")
    assert parallel.fsdp_spec((3, 3, 128, 128), 4, 1024) == P(None, None, None, "fsdp")  # tie: the later one
    assert parallel.fsdp_spec((3, 3, 12, 20), 8, 1) == P()  # no dimension divisible by 8
    assert parallel.fsdp_spec((512,), 8, 1024) == P()  # under min_size: replicated
    assert parallel.fsdp_spec((4096,), 8, 1024) == P("fsdp")
    assert parallel.fsdp_spec((4096,), 1, 1024) == P()


@pytest.mark.parametrize("devices, fsdp", [(1, 1), (2, 1), (2, 2), (4, 1), (4, 4), (8, 1), (8, 8)])
def test_mesh_step_equals_pmap(worker, devices, fsdp):
    """3 steps on the same global batch: the mesh step's params, EMA params, Adam state and
    losses equal pmap's (8 devices) within 1e-5, whatever the mesh; with fsdp = n every state
    array with a dimension divisible by n is split n ways (the rest replicated)."""
    record = next(r for r in worker[0] if r["devices"] == devices and r["fsdp"] == fsdp)
    assert record["step"] == 3 and record["moved"] > 1e-3  # the parameters did move
    for name in ("params", "ema_params", "opt_state", "loss"):
        assert record[name] < TOL, (name, record)
    split = 0
    for path, (shard, shape) in record["shards"].items():
        sharded = path.startswith(tuple(f".{f}" for f in parallel.SHARDED_STATE_FIELDS))
        divisible = any(d % fsdp == 0 for d in shape)
        expected = math.prod(shape) // fsdp if sharded and divisible and fsdp > 1 else math.prod(shape)
        assert math.prod(shard) == expected, (path, shard, shape)
        split += expected < math.prod(shape)
    assert split >= (12 if fsdp > 1 else 0)  # params, EMA params, Adam's mu and nu of the 3 layers
    if record["eval"] is not None:
        assert max(record["eval"].values()) < TOL, record["eval"]


def test_sampling_over_the_mesh_equals_one_device(worker):
    """The training loop's sampler over 8 devices at fsdp 8 (EMA parameters sharded, 16 samples
    split 2 per device) draws the samples one device draws from the same parameters, to float
    rounding (the 3-step model's samples reach |x| ~ 1e3)."""
    sampling = next(r for r in worker[0] if r["devices"] == r["fsdp"] == 8)["sampling"]
    assert sampling["shard_rows"] == [2] * 8, sampling
    assert max(sampling["sharded"], sampling["drawn"]) < 1e-5 * max(sampling["scale"], 1.0), sampling


def test_elastic_resume_on_other_device_counts_and_fsdp(worker, tmp_path):
    """Killed (SIGKILL) on 4 devices at fsdp 2 after its checkpoint of step 2 is complete; the
    sharded checkpoint resumes on 2 devices at fsdp 1 and on 8 at fsdp 4 (the data position is
    the step), and both end with the uninterrupted run's state."""
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(killed, 4, *RUN, "train.fsdp=2"), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.startswith("checkpoint step 4 saving"):  # the save of step 2 has finished
            break
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    complete, _ = _checkpoints(killed)
    assert complete and complete[-1] < 12, complete
    resumes = {}
    for devices, fsdp in ((2, 1), (8, 4)):
        workdir = tmp_path / f"resume_{devices}"
        shutil.copytree(killed, workdir)
        resumes[workdir] = subprocess.Popen(_cmd(workdir, devices, *RUN, f"train.fsdp={fsdp}"), env=ENV,
                                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for workdir, p in resumes.items():
        out = p.communicate(timeout=600)[0]
        assert p.returncode == 0, out[-3000:]
        m = re.search(r"resumed from step (\d+)", out)
        assert m and int(m.group(1)) == complete[-1], out[-3000:]
        state = _state(workdir)
        _assert_trained(state, 12)
        _assert_close(state, worker[1], atol=TOL)


def test_mesh_over_two_processes_equals_one(tmp_path):
    """jax.distributed on localhost, 2 processes x 2 devices, one mesh at fsdp 4 (every sharded
    array split across both processes; checkpoints written by both): both processes end with
    the state of 1 process x 4 devices at fsdp 4, and sample over the mesh of both (8 samples,
    2 per device) into the grid process 0 writes."""
    one = subprocess.Popen(_cmd(tmp_path / "one", 4, *RUN, "train.fsdp=4"), env=ENV, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    outs = run_processes(tmp_path, 2, *RUN, "train.fsdp=4", "sample.num_samples=8", timeout=600)
    out = one.communicate(timeout=600)[0]
    assert one.returncode == 0, out[-3000:]
    assert "2 process(es), 4 device(s)" in outs[0] and "mesh {'data': 1, 'fsdp': 4}" in outs[0]
    assert "samples written to" in outs[0] and (tmp_path / "samples" / "step_0000012.png").exists(), outs[0][-2000:]
    p0, p1 = _state(tmp_path, 0), _state(tmp_path, 1)
    for k in p0:
        np.testing.assert_array_equal(p0[k], p1[k])
    _assert_trained(p0, 12)
    _assert_close(p0, _state(tmp_path / "one"), atol=TOL)


@pytest.mark.parametrize("changes, field, allowed", [
    (dict(parallelism="shard_map"), "config.train.parallelism", "mesh"),
    (dict(fsdp=0), "config.train.fsdp", ">= 1"),
    (dict(fsdp=2), "config.train.fsdp", "train.parallelism = 'mesh'"),
    (dict(parallelism="mesh", fsdp=3), "config.train.fsdp", "must divide the number of devices (1)"),
    (dict(parallelism="mesh", fsdp_min_size=-1), "config.train.fsdp_min_size", ">= 0"),
])
def test_validation_of_the_parallelism_fields(changes, field, allowed):
    c = config_lib.defaults()
    c.train.update(changes)
    with pytest.raises(ValueError) as e:
        config_lib.validate(c)
    assert str(e.value).startswith(field) and allowed in str(e.value), str(e.value)
