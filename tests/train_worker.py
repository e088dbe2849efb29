"""Runs a tiny training job for tests/test_train.py in a fresh process.

    python tests/train_worker.py WORKDIR DEVICES [key=value overrides...] [--process I/N@PORT]

Forces DEVICES CPU devices, trains the tiny config below (2-D toy data, small
MLP, class-conditional on the mixture component with label dropout 0.5, so the
device-count, multi-process and resume tests cover labels in the step) and writes this process's final TrainState (params, EMA params, optimizer
state, loss history, step), one array per leaf named by its path, to
WORKDIR/state_<process>.npz.
"""
import faulthandler
import os
import sys

STALL_DUMP_S = 200  # within the 240 s the 2-process tests wait


def tiny_config():
    from vdm import config as config_lib
    from vdm.models import presets

    c = config_lib.defaults()
    c.data.source, c.data.name, c.data.num_test = "toy", "gaussians2d", 32
    c.data.conditional, c.train.label_dropout = True, 0.5
    c.model = presets.toy_mlp()
    c.model.update(dict(hidden=32, depth=2, embed_dim=8))
    c.diffusion.update(dict(schedule="linear", T=50))
    c.optim.update(dict(lr=1e-2, warmup_steps=2, ema_decay=0.9))
    c.train.update(dict(num_steps=3, batch_size=16, log_every=1, checkpoint_every=1000, keep_checkpoints=3))
    c.eval.update(dict(every=1000, batch_size=16, elbo_samples=2))
    c.sample.num_samples = 0
    return c


def configure(args):
    """The tiny config with ``section.field=value`` overrides and ``--process=I/N@PORT``."""
    config = tiny_config()
    for arg in args:
        if arg.startswith("--process"):
            spec, port = arg.split("=")[1].split("@")
            pid, n = map(int, spec.split("/"))
            config.train.update(dict(distributed=True, coordinator_address=f"localhost:{port}",
                                     num_processes=n, process_id=pid))
            continue
        key, value = arg.split("=", 1)
        section, field = key.split(".")
        config[section][field] = type(config[section][field])(eval(value))
    return config


def save_state(workdir, state):
    """One array per leaf of the TrainState, named by its path, in WORKDIR/state_<process>.npz."""
    import jax
    import numpy as np

    leaves = jax.tree_util.tree_leaves_with_path(state)
    np.savez(os.path.join(workdir, f"state_{jax.process_index()}.npz"),
             **{jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves})


def main(workdir, devices, args):
    # A worker still running after STALL_DUMP_S prints every thread's stack (and runs on), so a
    # stalled run's output shows where it waits when the test kills it.
    faulthandler.dump_traceback_later(STALL_DUMP_S)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests.conftest import xla_flags

    os.environ["XLA_FLAGS"] = xla_flags(devices)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from vdm import train

    config = configure(args)
    train.setup_distributed(config.train)
    save_state(workdir, train.train_and_evaluate(config, workdir))
    print("worker done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
