"""Mesh vs pmap on sub-meshes of 8 forced CPU devices, and an uninterrupted mesh run, for
tests/test_parallel.py.

    python tests/parallel_worker.py OUT_DIR [key=value overrides of the straight run...]

1. From the same state on the same global batch of 16 (the tiny config of
   tests/train_worker.py), 3 train steps (one host call, ``lax.scan``) with
   ``parallel.PmapRunner`` on all 8 devices, and with ``parallel.MeshRunner`` on
   ``jax.devices()[:n]``, n = 1, 2, 4, 8, at fsdp = 1 and fsdp = n (every array with a
   dimension divisible by n sharded); on 8 devices at fsdp 8 also one eval batch, and
   16 samples drawn over the mesh (``MeshRunner.draw``, ``samplers.sample(sharding=...)``)
   beside the samples one device draws from the same parameters.
   OUT_DIR/compare.json gets, per case, the largest absolute difference from pmap's of the
   params, EMA params, optimizer state and losses, the relative difference of the eval sums,
   the samples' largest difference and the rows of each device's shard, and each state
   array's per-device shard shape beside its shape.
2. ``train.train_and_evaluate`` with the overrides (a mesh over all 8 devices) in
   OUT_DIR/straight, its final state in OUT_DIR/straight/state_0.npz.
"""
import functools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.conftest import xla_flags  # noqa: E402  (after the path insert)

os.environ["XLA_FLAGS"] = xla_flags(8)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

STEPS = 3
SAMPLES = 16  # drawn over the 8-device mesh at fsdp 8, 2 per device


def main(out_dir):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from tests.train_worker import tiny_config
    from vdm import build, data, parallel, train_step

    c = tiny_config()
    c.train.steps_per_call = STEPS
    c.train.fsdp_min_size = 0  # shard every array with a dimension divisible by fsdp
    batch = c.train.batch_size
    ds = data.build_dataset(c.data, split="train", global_batch_size=batch, seed=0, process_index=0,
                            process_count=1, local_device_count=1)
    eval_ds = data.build_dataset(c.data, split="test", global_batch_size=batch, seed=0, process_index=0,
                                 process_count=1, local_device_count=1)
    setup = build.build_setup(c, ds)
    optimizer = train_step.make_optimizer(c.optim, c.train.num_steps)
    params = setup.init_params(jax.random.PRNGKey(0))
    init = jax.device_get(train_step.TrainState(step=jnp.int32(0), params=params, ema_params=params,
                                                opt_state=optimizer.init(params), rng=jax.random.PRNGKey(1),
                                                loss_state=setup.objective.init_loss_state()))
    # [k, B, ...]: the global batches (the tiny config is class-conditional: x and label)
    steps = {key: np.stack([ds.get_batch(i)[key][0] for i in range(STEPS)]) for key in ("x", "label")}
    eval_batch = next(eval_ds.iterate_epoch(batch))  # [1, B, ...] with its mask
    step = lambda reductions: train_step.multi_step(  # noqa: E731
        reductions, objective=setup.objective, optimizer=optimizer, optim=c.optim)
    evaluate_step = lambda reductions: functools.partial(  # noqa: E731
        train_step.eval_step, objective=setup.objective, reductions=reductions)
    rng, index, sample_key = jax.random.PRNGKey(2), np.int32(0), jax.random.PRNGKey(3)

    def run(runner, n, with_eval=True):
        local = lambda a: a.reshape((n, -1) + a.shape[1:])  # noqa: E731  [B, ...] -> [n, B / n, ...]
        if runner.name == "pmap":
            batches = {key: np.stack([local(b) for b in v], axis=1) for key, v in steps.items()}  # [n, k, B / n]
            eval_in = {k: local(v[0]) for k, v in eval_batch.items()}
        else:  # the loop's [local devices, k, b, ...] layout; one process holds the whole batch
            batches = {key: v[None] for key, v in steps.items()}
            eval_in = eval_batch
        state = runner.place_state(init)
        state, metrics, _ = runner.train(state, runner.place_batches(batches), runner.flag(-1))
        sums = runner.eval_sums(state.ema_params, state.loss_state, eval_in, rng, index) if with_eval else None
        return runner, state, runner.host(state), runner.host_metrics(metrics), sums

    def max_diff(a, b):  # noqa: E306
        return max(float(np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64)).max())
                   for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    results = []
    devices = jax.devices()
    _, _, ref, ref_metrics, ref_sums = run(parallel.PmapRunner(step, evaluate_step, devices), 8)
    for n in (1, 2, 4, 8):
        for fsdp in sorted({1, n}):
            mesh = parallel.make_mesh(fsdp, devices[:n])
            runner, state, got, metrics, sums = run(
                parallel.MeshRunner(step, evaluate_step, init, mesh, c.train.fsdp_min_size), n, n == fsdp == 8)
            if n == fsdp == 8:  # the training loop's sampler over the mesh, against one device's samples
                sharded = setup.sample(state.ema_params, sample_key, num_samples=SAMPLES, sharding=runner._rows)
                drawn = runner.draw(setup.sample, state.ema_params, sample_key, SAMPLES)
                alone = setup.sample(got.ema_params, sample_key, num_samples=SAMPLES)  # one device, same params
                sampling = dict(shard_rows=[s.data.shape[0] for s in sharded.addressable_shards],
                                scale=float(np.abs(alone).max()),
                                sharded=max_diff(sharded, alone), drawn=max_diff(drawn, alone))
            results.append(dict(
                devices=n, fsdp=fsdp, step=int(got.step),
                params=max_diff(got.params, ref.params), ema_params=max_diff(got.ema_params, ref.ema_params),
                opt_state=max_diff(got.opt_state, ref.opt_state), loss=max_diff(metrics["loss"], ref_metrics["loss"]),
                eval={k: abs(sums[k] - ref_sums[k]) / max(abs(ref_sums[k]), 1.0) for k in ref_sums} if sums else None,
                sampling=sampling if n == fsdp == 8 else None,
                moved=max_diff(got.params, init.params),
                shards={jax.tree_util.keystr(path): [list(s.shard_shape(np.shape(p))), list(np.shape(p))]
                        for (path, p), s in zip(jax.tree_util.tree_leaves_with_path(init),
                                                jax.tree.leaves(runner.shardings))}))
            print(results[-1]["devices"], fsdp, results[-1]["params"], flush=True)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "compare.json"), "w") as f:
        json.dump(results, f)


def straight_run(out_dir, args):
    """The uninterrupted loop run (mesh over all 8 devices) the elastic-resume test compares to."""
    from tests import train_worker
    from vdm import train

    workdir = os.path.join(out_dir, "straight")
    train_worker.save_state(workdir, train.train_and_evaluate(train_worker.configure(args), workdir))


if __name__ == "__main__":
    main(sys.argv[1])
    straight_run(sys.argv[1], sys.argv[2:])
