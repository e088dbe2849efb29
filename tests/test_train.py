"""The training loop: device-count invariance, multi-process runs, exact kill-and-resume,
config validation.

Runs go through tests/train_worker.py in fresh processes (each forces its own number
of CPU devices) on a tiny 2-D toy config.
"""
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from vdm import config as config_lib

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_worker.py")
ENV = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")


def _cmd(workdir, devices, *args):
    return [sys.executable, WORKER, str(workdir), str(devices), *args]


def _run(workdir, devices, *args, timeout=240):
    proc = subprocess.run(_cmd(workdir, devices, *args), env=ENV, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _params(workdir, process=0):
    with np.load(os.path.join(workdir, f"params_{process}.npz")) as f:
        return {k: f[k] for k in f.files}


def _assert_close(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=atol, rtol=1e-4, err_msg=k)


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("d1")
    _run(workdir, 1)
    return _params(workdir)


@pytest.mark.parametrize("devices", [2, 4])
def test_same_params_on_1_2_4_devices(one_device, tmp_path, devices):
    """Same global batch and seed: 3 pmapped steps give the same params on any device count."""
    _run(tmp_path, devices)
    _assert_close(_params(tmp_path), one_device)
    assert any(np.abs(v).max() > 0 for v in one_device.values())


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(one_device, tmp_path):
    """jax.distributed on localhost (gloo CPU collectives), 2 processes x 2 devices: both end
    with identical params, equal to the 1-process run on the same global batch."""
    port = _free_port()
    procs = [subprocess.Popen(_cmd(tmp_path, 2, f"--process={i}/2@{port}"), env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert "2 process(es), 4 device(s)" in outs[0]
    p0, p1 = _params(tmp_path, 0), _params(tmp_path, 1)
    for k in p0:
        np.testing.assert_array_equal(p0[k], p1[k])
    _assert_close(p0, one_device)


def _checkpoints(workdir):
    root = os.path.join(workdir, "checkpoints")
    names = os.listdir(root) if os.path.isdir(root) else []
    return sorted(int(n) for n in names if n.isdigit()), [n for n in names if not n.isdigit()]


RESUME_ARGS = ("train.num_steps=16", "train.checkpoint_every=2", "train.keep_checkpoints=3")


def test_sigkill_and_resume_is_exact(tmp_path):
    """SIGKILL at random moments, the first right after an async checkpoint save starts; every
    rerun resumes from the newest complete checkpoint (never a half-written one) and the final
    params equal an uninterrupted run's exactly."""
    _run(tmp_path / "straight", 1, *RESUME_ARGS)
    expected = _params(tmp_path / "straight")

    workdir = tmp_path / "killed"
    rng = random.Random(0)
    complete = []
    for attempt in range(2):
        proc = subprocess.Popen(_cmd(workdir, 1, *RESUME_ARGS), env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
        delay, started = rng.uniform(0.0, 1.5), None
        for line in proc.stdout:
            m = re.match(r"(?:resumed from|starting at) step (\d+)", line)
            if m:  # the previous kill left `complete`; resuming from anything else is wrong
                assert int(m.group(1)) == (complete[-1] if complete else 0), (line, complete)
            if line.startswith("step ") and started is None:
                started = time.time()
            if attempt == 0 and line.startswith("checkpoint step"):
                break  # kill while the async save is being written
            if attempt > 0 and started is not None and time.time() - started > delay:
                break
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        complete, _ = _checkpoints(workdir)
    out = _run(workdir, 1, *RESUME_ARGS)
    assert f"resumed from step {complete[-1]}" in out if complete else "starting at step 0" in out
    _assert_exact(_params(workdir), expected)


def _assert_exact(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ---------------------------------------------------------------------------
# Config validation (in process, nothing compiles).
# ---------------------------------------------------------------------------


def _bad(**changes):
    c = config_lib.defaults()
    for key, value in changes.items():
        section, field = key.split("__")
        c[section][field] = value
    return c


@pytest.mark.parametrize("changes, field, allowed", [
    (dict(diffusion__parameterization="noise"), "config.diffusion.parameterization", "eps"),
    (dict(diffusion__schedule="quadratic"), "config.diffusion.schedule", "cosine"),
    (dict(diffusion__variance="learned_range"), "config.loss.name", "hybrid"),
    (dict(loss__name="l2"), "config.loss.name", "vlb"),
    (dict(optim__decay="step"), "config.optim.decay", "cosine"),
    (dict(train__batch_size=0), "config.train.batch_size", ">= 1"),
    (dict(train__steps_per_call=7), "config.train.num_steps", "multiple"),
    (dict(sample__sampler="euler"), "config.sample.sampler", "ddim"),
    (dict(data__source="tfds", data__name="no_such_dataset_xyz"), "config.data.name", "TFDS"),
    (dict(data__source="folder", data__path="/no/such/folder"), "config.data.path", "does not exist"),
    (dict(loss__importance_sampling=True), "config.loss.importance_sampling", "vlb"),
    (dict(model__learned_variance=False), "config.model.learned_variance", "diffusion.variance"),
    (dict(model__name="resnet"), "config.model.name", "unet"),
    (dict(loss__schedule_gradient="reverse"), "config.loss.schedule_gradient", "variance"),
    (dict(loss__schedule_gradient="variance"), "config.loss.schedule_gradient", "continuous"),
])
def test_validation_names_field_and_allowed_values(changes, field, allowed):
    with pytest.raises(ValueError) as e:
        config_lib.validate(_bad(**changes))
    assert field in str(e.value) and allowed in str(e.value), str(e.value)


def test_validation_batch_not_divisible_by_devices(tmp_path):
    code = ("import sys; sys.path.insert(0, %r)\n"
            "from vdm import config\nc = config.defaults(); c.train.batch_size = 6\n"
            "config.validate(c)\n") % os.path.dirname(os.path.dirname(WORKER))
    env = dict(ENV, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "config.train.batch_size" in out.stderr and "(4)" in out.stderr


def test_validation_continuous_time_needs_vdm_loss():
    c = config_lib.defaults()
    c.diffusion.update(dict(time="continuous", schedule="learned", T=0))
    with pytest.raises(ValueError, match="config.loss.name.*vdm"):
        config_lib.validate(c)
    c.loss.name = "vdm"
    config_lib.validate(c)


def test_variance_schedule_gradient_run_is_the_same_on_1_and_2_devices(tmp_path):
    """The VDM loss with a learned schedule trained by the variance-minimizing gradient
    (loss.schedule_gradient = variance): per-example scaling inside the pmapped step, so the
    parameters after 3 steps, the schedule's included, do not depend on the device count."""
    vdm = ["diffusion.time='continuous'", "diffusion.schedule='learned'", "diffusion.T=0",
           "loss.name='vdm'", "loss.schedule_gradient='variance'"]
    params = []
    for devices in (1, 2):
        _run(tmp_path / str(devices), devices, *vdm, timeout=600)
        params.append(_params(tmp_path / str(devices)))
    assert any("schedule" in k and "l2" in k for k in params[0])  # the schedule's interior is compared too
    # atol 1e-4: the continuous loss weights -dlambda/dt (up to ~20) and the factor 2 L scale up
    # float32 reduction-order differences, which Adam's first steps pass on at the size of lr.
    _assert_close(params[0], params[1], atol=1e-4)


def test_every_config_file_validates():
    import importlib.util
    root = os.path.join(os.path.dirname(os.path.dirname(WORKER)), "configs")
    names = sorted(n for n in os.listdir(root) if n.endswith(".py"))
    assert {"default.py", "digits.py", "gaussians2d.py"} <= set(names)
    for name in names:
        spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(root, name))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        c = module.get_config()
        assert module.__doc__ and "python scripts/train.py" in module.__doc__, name
        if c.data.source in ("digits", "toy"):  # others need their data on disk
            config_lib.validate(c)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    proc = subprocess.run(_cmd(tmp_path, 1, "optim.lr=1e30", "optim.grad_clip=0.0", "train.num_steps=20",
                               "train.checkpoint_every=1"),
                          env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    m = re.search(r"non-finite loss or gradient at steps (\d+)\.\.\d+.*last good checkpoint is step (\d+)",
                  proc.stderr)
    assert m, proc.stderr[-3000:]
    bad, last = int(m.group(1)), int(m.group(2))
    assert last == bad - 1 and _checkpoints(tmp_path)[0][-1] == last
