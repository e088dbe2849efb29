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

import json

import numpy as np
import pytest

from tests.conftest import xla_flags
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


def _state(workdir, process=0):
    """The final TrainState a worker saved: {leaf path: array}, e.g. ".params['net']...",
    ".ema_params[...]", ".opt_state[...]" (Adam's count, mu, nu), ".loss_state...", ".step"."""
    with np.load(os.path.join(workdir, f"state_{process}.npz")) as f:
        return {k: f[k] for k in f.files}


def _assert_trained(state, steps):
    """The state holds params, EMA params and optimiser moments that all moved over ``steps``
    Adam updates: the count is ``steps`` and the EMA differs from the params."""
    parts = {p: [k for k in state if k.startswith(p)] for p in (".params", ".ema_params", ".opt_state")}
    assert all(parts.values()), sorted(state)
    counts = [int(state[k]) for k in parts[".opt_state"] if k.endswith(".count")]
    assert counts and all(c == steps for c in counts), counts
    mu = [k for k in parts[".opt_state"] if ".mu" in k]
    assert mu and all(np.abs(state[k]).max() > 0 for k in mu)
    assert any(np.abs(state[k] - state[k.replace(".params", ".ema_params", 1)]).max() > 1e-6
               for k in parts[".params"])


def _losses(workdir):
    """The logged training loss of every step (the last record of a step rerun after a resume)."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _assert_close(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=atol, rtol=1e-4, err_msg=k)


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("d1")
    _run(workdir, 1)
    return _state(workdir), _losses(workdir)


@pytest.mark.parametrize("devices", [2, 4])
def test_same_state_on_1_2_4_devices(one_device, tmp_path, devices):
    """Same global batch and seed: 3 pmapped steps give the same params, EMA params, optimizer
    state and loss history on any device count (the tiny config is class-conditional with label
    dropout 0.5, so which labels are dropped must not depend on the device count either)."""
    _run(tmp_path, devices)
    state, losses = one_device
    _assert_trained(state, 3)
    assert any("class_embedding" in k for k in state), sorted(state)
    _assert_close(_state(tmp_path), state)
    np.testing.assert_allclose(list(_losses(tmp_path).values()), list(losses.values()), rtol=1e-5)
    assert sorted(losses) == [1, 2, 3]


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_processes(workdir, devices, *args, timeout=240):
    """Two train_worker processes joined by jax.distributed on a free localhost port; their
    outputs. A pair that has not finished within ``timeout`` is killed and the test fails with
    both outputs (each worker prints every thread's stack first, see train_worker.STALL_DUMP_S)."""
    port = _free_port()
    procs = [subprocess.Popen(_cmd(workdir, devices, *args, f"--process={i}/2@{port}"), env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    deadline, outs = time.time() + timeout, []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=max(deadline - time.time(), 1))[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        outs = [p.communicate()[0] for p in procs]
        tails = (f"--- process {i}\n{out[-4000:]}" for i, out in enumerate(outs))
        pytest.fail("2-process run timed out:\n" + "\n".join(tails))
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return outs


def test_two_processes_match_one(one_device, tmp_path):
    """jax.distributed on localhost (gloo CPU collectives), 2 processes x 1 device: both end
    with identical params, equal to the 1-device run on the same global batch.

    One device per process: with 2 forced CPU devices per process, the pmapped run stalls in
    about half the runs under jax 0.10.2 (one process blocks on a device of its own after the
    other has finished; openxla/xla#16430 is another fault of CPU collectives with several
    forced host devices). The mesh runner over 2 processes x 2 devices
    (test_parallel.test_mesh_over_two_processes_equals_one) does not stall."""
    outs = run_processes(tmp_path, 1)
    assert "2 process(es), 2 device(s)" in outs[0]
    p0, p1 = _state(tmp_path, 0), _state(tmp_path, 1)
    assert p0.keys() == p1.keys()
    for k in p0:
        np.testing.assert_array_equal(p0[k], p1[k])
    _assert_trained(p0, 3)
    _assert_close(p0, one_device[0])
    np.testing.assert_allclose(list(_losses(tmp_path).values()), list(one_device[1].values()), rtol=1e-5)


def test_pmap_over_cpu_processes_with_several_devices_is_refused(tmp_path):
    """2 processes x 2 CPU devices under pmap stop at once, naming the field and the way out."""
    port = _free_port()
    procs = [subprocess.Popen(_cmd(tmp_path, 2, f"--process={i}/2@{port}"), env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    for p in procs:
        out = p.communicate(timeout=240)[0]
        assert p.returncode != 0 and "config.train.parallelism = 'pmap' with 2 CPU processes of 2 devices" in out, \
            out[-3000:]


def _checkpoints(workdir):
    root = os.path.join(workdir, "checkpoints")
    names = os.listdir(root) if os.path.isdir(root) else []
    return sorted(int(n) for n in names if n.isdigit()), [n for n in names if not n.isdigit()]


# The vlb loss with importance-sampled t keeps a loss history in the state, which a resume must restore.
RESUME_ARGS = ("train.num_steps=16", "train.checkpoint_every=2", "train.keep_checkpoints=3", "loss.name='vlb'",
               "loss.importance_sampling=True", "loss.history=2")


def test_sigkill_and_resume_is_exact(tmp_path):
    """SIGKILL at random moments, the first right after an async checkpoint save starts; every
    rerun resumes from the newest complete checkpoint (never a half-written one) and the final
    params, EMA params, optimizer state, importance-sampling loss history and logged losses equal
    an uninterrupted run's exactly, for a class-conditional run with label dropout."""
    _run(tmp_path / "straight", 1, *RESUME_ARGS)
    expected = _state(tmp_path / "straight")
    _assert_trained(expected, 16)
    assert any("class_embedding" in k for k in expected)  # a class-conditional run (tiny_config)
    history = [k for k in expected if k.startswith(".loss_state")]
    assert history and any(np.abs(expected[k]).max() > 0 for k in history), sorted(expected)

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
    _assert_exact(_state(workdir), expected)
    assert _losses(workdir) == _losses(tmp_path / "straight")


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
    (dict(loss__schedule_gradient="variance"), "config.loss.schedule_gradient", "does not read it"),
])
def test_validation_names_field_and_allowed_values(changes, field, allowed):
    with pytest.raises(ValueError) as e:
        config_lib.validate(_bad(**changes))
    assert field in str(e.value) and allowed in str(e.value), str(e.value)


def test_validation_batch_not_divisible_by_devices(tmp_path):
    code = ("import sys; sys.path.insert(0, %r)\n"
            "from vdm import config\nc = config.defaults(); c.train.batch_size = 6\n"
            "config.validate(c)\n") % os.path.dirname(os.path.dirname(WORKER))
    env = dict(ENV, XLA_FLAGS=xla_flags(4))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "config.train.batch_size" in out.stderr and "(4)" in out.stderr


def test_validation_continuous_time_needs_vdm_loss():
    c = config_lib.defaults()
    c.diffusion.update(dict(time="continuous", schedule="learned", T=0))
    c.sample.num_steps = 100
    with pytest.raises(ValueError, match="config.loss.name.*vdm"):
        config_lib.validate(c)
    c.loss.name = "vdm"
    config_lib.validate(c)


# What each loss reads (build.build_objective), written out: discrete simple/hybrid read the simple
# loss's options (snr_gamma with weighting min_snr, hybrid_lambda for hybrid); discrete vlb reads
# none, continuous vdm its schedule gradient only; continuous simple its training-time distribution.
UNREAD_VALUES = dict(loss_type="l1", weighting="snr", target="x0", snr_gamma=3.0, hybrid_lambda=0.01,
                     t_sampling="logit_normal", t_loc=0.5, t_scale=2.0, schedule_gradient="variance")
LOSS_READS = {
    ("discrete", "simple"): {"loss_type", "weighting", "target"},
    ("discrete", "hybrid"): {"loss_type", "weighting", "target", "hybrid_lambda"},
    ("discrete", "vlb"): set(),
    ("continuous", "vdm"): {"schedule_gradient"},
    ("continuous", "simple"): {"t_sampling", "t_loc", "t_scale"},
}


@pytest.mark.parametrize("time, loss", list(LOSS_READS))
@pytest.mark.parametrize("field", list(UNREAD_VALUES))
def test_validation_refuses_a_loss_field_the_loss_does_not_read(time, loss, field):
    """Setting a loss option the configured loss ignores fails naming the field; one it reads validates."""
    c = config_lib.defaults()
    if time == "continuous":
        c.diffusion.update(dict(time="continuous", schedule="cosine", T=0, variance="fixed_small"))
        c.sample.num_steps = 100
    c.loss.name = loss
    c.loss[field] = UNREAD_VALUES[field]
    if field in LOSS_READS[(time, loss)]:
        config_lib.validate(c)
    else:
        with pytest.raises(ValueError, match=rf"config\.loss\.{field} = .* is not allowed: .*reads? it"):
            config_lib.validate(c)


def test_validation_snr_gamma_only_with_min_snr():
    c = _bad(loss__snr_gamma=3.0)
    with pytest.raises(ValueError, match="config.loss.snr_gamma = 3.0 .*only loss.weighting = 'min_snr'"):
        config_lib.validate(c)
    c.loss.weighting = "min_snr"
    config_lib.validate(c)


def test_variance_schedule_gradient_run_is_the_same_on_1_and_2_devices(tmp_path):
    """The VDM loss with a learned schedule trained by the variance-minimizing gradient
    (loss.schedule_gradient = variance): per-example scaling inside the pmapped step, so the
    parameters after 3 steps, the schedule's included, do not depend on the device count."""
    vdm = ["diffusion.time='continuous'", "diffusion.schedule='learned'", "diffusion.T=0",
           "loss.name='vdm'", "loss.schedule_gradient='variance'", "sample.num_steps=10",
           "data.conditional=False", "train.label_dropout=0.0"]  # (the unconditional step's device check)
    params = []
    for devices in (1, 2):
        _run(tmp_path / str(devices), devices, *vdm, timeout=600)
        state = _state(tmp_path / str(devices))
        params.append({k: v for k, v in state.items() if k.startswith((".params", ".ema_params"))})
    assert any("schedule" in k and "l2" in k for k in params[0])  # the schedule's interior is compared too
    # atol 5e-4 (lr is 1e-2): the continuous loss weights -dlambda/dt (up to ~20) and the factor 2 L
    # scale up float32 reduction-order differences, which Adam's first steps pass on at the size of
    # lr where a gradient is near zero (on a 2 GHz AVX2 CPU one of the schedule's 1024 l2 biases
    # differed by 1.5e-4, the same before and after the CPU Dense layer).
    _assert_close(params[0], params[1], atol=5e-4)


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
    m = re.search(r"non-finite (loss|gradient) at step (\d+).*last good checkpoint is step (\d+)", proc.stderr)
    assert m, proc.stderr[-3000:]
    bad, last = int(m.group(2)), int(m.group(3))
    assert last == bad - 1 and _checkpoints(tmp_path)[0][-1] == last
    # the diagnosis: schedule ends checked, the examples' t named, the divergence found
    assert "schedule log-SNR at the ends: t=1:" in proc.stderr
    assert re.search(r"loss (non-finite for \d+ of 16 examples, at t in|finite for all 16)", proc.stderr)
    assert "cause: the parameters diverged; lower optim.lr" in proc.stderr


# ---------------------------------------------------------------------------
# Paths that validation accepted and the loop then crashed on (issue 19).
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("changes, field, allowed", [
    # a one-step learned variance cannot be respaced by ancestral / pc sampling
    (dict(diffusion__variance="learned", loss__name="hybrid", sample__num_steps=100),
     "config.sample.num_steps", "learned_range"),
    # continuous time with T = 0 has no default number of sampling steps
    (dict(diffusion__time="continuous", diffusion__schedule="learned", diffusion__T=0, loss__name="vdm"),
     "config.sample.num_steps", "sampling steps"),
    # quadratic / karras spacing over all T steps repeat timesteps
    (dict(sample__spacing="quadratic"), "config.sample.spacing", "repeats timesteps"),
    (dict(sample__spacing="karras"), "config.sample.spacing", "repeats timesteps"),
])
def test_validation_refuses_what_sampling_cannot_run(changes, field, allowed):
    with pytest.raises(ValueError) as e:
        config_lib.validate(_bad(**changes))
    assert str(e.value).startswith(field) and allowed in str(e.value), str(e.value)


def test_validation_per_step_heads_needs_one_head_per_step():
    import configs.swissroll as swissroll

    c = swissroll.get_config()
    config_lib.validate(c)
    c.diffusion.T = 50  # heads 41..50 would be clamped to head 40
    with pytest.raises(ValueError, match=r"config.model.num_steps = 40.*diffusion.T = 50"):
        config_lib.validate(c)


def test_optimizer_stepped_follows_multisteps():
    """With accumulation over 2 micro-batches the optimiser steps on every 2nd update only."""
    import jax.numpy as jnp

    from vdm import train_step

    c = config_lib.defaults()
    c.optim.accum_steps = 2
    tx = train_step.make_optimizer(c.optim, 10)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    stepped = []
    for _ in range(4):
        _, state = tx.update({"w": jnp.ones(3)}, state, params)
        stepped.append(bool(train_step.optimizer_stepped(tx, state)))
    assert stepped == [False, True, False, True]
    c.optim.accum_steps = 1
    assert bool(train_step.optimizer_stepped(train_step.make_optimizer(c.optim, 10), None))


def test_accumulated_step_equals_one_step_over_the_combined_batch(tmp_path):
    """configs/image_folder.py at tiny size on a folder of real PNG/JPEG files: 2 updates of
    2 accumulated micro-batches of 4 give the params and EMA params of 2 steps over the
    combined batches of 8 (same per-example t and noise: keys follow the update)."""
    import jax
    import jax.numpy as jnp

    import configs.image_folder as image_folder
    from tests.conftest import make_image_folder
    from vdm import build, data, parallel, train_step

    folder, _ = make_image_folder(tmp_path / "images")
    c = image_folder.get_config()
    c.data.update(dict(path=folder, image_size=8, num_test=2, skip_bad_files=True, random_flip=False))
    c.model.update(dict(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_groups=4))
    c.diffusion.T = 50
    c.optim.update(dict(warmup_steps=0, lr=1e-4))
    c.train.update(dict(batch_size=4, num_steps=4))
    c.sample.num_steps = 5
    config_lib.validate(c)
    ds = data.build_dataset(c.data, split="train", global_batch_size=4, seed=0)
    setup = build.build_setup(c, ds)
    params = setup.init_params(jax.random.PRNGKey(0))
    batches = [ds.get_batch(i)["x"] for i in range(4)]

    def run(optim, num_steps, xs):
        tx = train_step.make_optimizer(optim, num_steps)
        state = train_step.TrainState(step=jnp.int32(0), params=params, ema_params=params, opt_state=tx.init(params),
                                      rng=jax.random.PRNGKey(1), loss_state={})
        p_train = train_step.make_p_train(setup.objective, tx, optim)
        state, _ = p_train(parallel.replicate(state), {"x": np.stack(xs, axis=1)})
        return jax.device_get(jax.tree.map(lambda a: a[0], state))  # the first device's copy

    accumulated = run(c.optim, 4, batches)
    combined = c.optim.copy_and_resolve_references()
    combined.accum_steps = 1
    one = run(combined, 2, [np.concatenate(batches[0:2], axis=1), np.concatenate(batches[2:4], axis=1)])
    for name in ("params", "ema_params"):
        a, b = jax.tree.leaves(getattr(accumulated, name)), jax.tree.leaves(getattr(one, name))
        assert max(float(np.abs(x - y).max()) for x, y in zip(a, b)) < 1e-6, name
    moved = max(float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(one.params), jax.tree.leaves(params)))
    assert moved > 1e-5  # the two updates did change the parameters


def test_steps_per_call_leaves_the_trained_state_unchanged():
    """3 steps in one host call (``train.steps_per_call = 3``, one ``lax.scan``) end with the
    params, EMA params, optimiser state and per-step losses of 3 calls of one step each (the
    tiny class-conditional config: per-step keys for t, noise and label dropout)."""
    import jax

    from tests.train_worker import tiny_config
    from vdm import build, data, parallel, train_step

    c = tiny_config()
    ds = data.build_dataset(c.data, split="train", global_batch_size=16, seed=0)
    setup = build.build_setup(c, ds)
    tx = train_step.make_optimizer(c.optim, 3)
    init = train_step.initial_state(setup, tx, jax.random.PRNGKey(0))
    state = parallel.replicate(init)
    batches = {k: np.stack([ds.get_batch(i)[k] for i in range(3)], axis=1) for k in ("x", "label")}  # [1, 3, B]
    p_train = train_step.make_p_train(setup.objective, tx, c.optim)
    one_call, metrics = p_train(state, batches)
    losses = []
    for i in range(3):
        state, m = p_train(state, {k: v[:, i:i + 1] for k, v in batches.items()})
        losses.append(m["loss"][0, 0])
    np.testing.assert_allclose(losses, metrics["loss"][0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(one_call), jax.tree.leaves(state)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    moved = max(float(np.abs(a[0] - b).max()) for a, b in zip(jax.tree.leaves(one_call.params),
                                                               jax.tree.leaves(init.params)))
    assert moved > 1e-3  # the steps did change the parameters


def test_train_time_sampler_compiles_once_for_new_params():
    """The loop's sampler takes the parameters as an argument: new EMA parameters (host NumPy
    arrays, as the loop passes them) reuse the compiled sampler."""
    import jax

    from tests.train_worker import tiny_config
    from vdm import build, data, samplers

    c = tiny_config()
    c.sample.num_samples = 4
    ds = data.build_dataset(c.data, split="train", global_batch_size=16, seed=0)
    setup = build.build_setup(c, ds)
    p1 = jax.device_get(setup.init_params(jax.random.PRNGKey(0)))
    p2 = jax.device_get(setup.init_params(jax.random.PRNGKey(1)))
    a = np.asarray(setup.sample(p1, jax.random.PRNGKey(2)))
    size = samplers.front._run_jit._cache_size()
    b = np.asarray(setup.sample(p2, jax.random.PRNGKey(2)))
    assert samplers.front._run_jit._cache_size() == size
    assert a.shape == (4, 2) and not np.allclose(a, b)  # the new parameters were used


# ---------------------------------------------------------------------------
# The prefetching loop and the device-side non-finite check (issue 18).
# ---------------------------------------------------------------------------


def test_prefetching_loop_equals_synchronous_loop(one_device, tmp_path):
    """The queue changes when batches are made, not which batch a step sees: the default loop
    (a thread preparing 2 host calls ahead) ends with exactly the state and losses of the loop
    that makes each batch when its step runs (train.prefetch = 0)."""
    _run(tmp_path, 1, "train.prefetch=0")
    _assert_exact(_state(tmp_path), one_device[0])
    assert _losses(tmp_path) == one_device[1]


def test_non_finite_step_between_checks_is_named_and_the_checkpoint_before_it_kept(tmp_path):
    """A NaN example planted in the data makes step k's loss non-finite. The host reads the
    device's flag only at log/checkpoint steps (every 4): the run still stops naming step k, the
    replayed diagnosis finds the example, and the newest checkpoint is the last multiple of 4
    before k (the steps after k were skipped on the device, nothing later was saved)."""
    from tests.train_worker import tiny_config
    from vdm import data

    n, batch, planted_step = 200, 16, 6  # 0-based: the 7th step
    x = np.random.default_rng(0).normal(size=(n, 2)).astype(np.float32)
    x[:, 0] = np.arange(n)  # each example's id, to find the one step 6 draws first
    path = str(tmp_path / "points.npz")
    np.savez(path, x=x)
    cfg = tiny_config().data
    cfg.update(dict(source="npz", path=path, num_test=8, conditional=False))
    build = lambda: data.build_dataset(cfg, split="train", global_batch_size=batch, seed=0, process_index=0,
                                       process_count=1, local_device_count=1)
    victim = int(build().get_batch(planted_step)["x"][0, 0, 0])
    x[:, 0] = np.random.default_rng(1).normal(size=n)
    x[victim, 1] = np.nan
    np.savez(path, x=x)
    ds = build()
    nan_steps = [s for s in range(20) if np.isnan(ds.get_batch(s)["x"]).any()]
    assert nan_steps[0] == planted_step, nan_steps  # the data module agrees where the NaN is

    workdir = tmp_path / "run"
    proc = subprocess.run(_cmd(workdir, 1, "data.source='npz'", f"data.path='{path}'", "data.num_test=8",
                               "data.conditional=False", "train.label_dropout=0.0", "train.num_steps=20",
                               "train.log_every=4", "train.checkpoint_every=4",
                               "eval.every=20"),
                          env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    m = re.search(r"non-finite loss or gradient in step (\d+) \(found at step (\d+);.*"
                  r"non-finite loss at step (\d+).*last good checkpoint is step (\d+)", proc.stderr)
    assert m, proc.stderr[-3000:]
    assert [int(g) for g in m.groups()] == [planted_step + 1, 8, planted_step + 1, 4]
    assert "loss non-finite for 1 of 16 examples" in proc.stderr
    assert _checkpoints(workdir)[0] == [4]
    assert sorted(_losses(workdir)) == [4]  # nothing logged from the skipped steps
