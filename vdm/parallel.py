"""How a train step runs on many devices: ``pmap`` (data parallel) or one ``jit`` over a mesh.

The train and eval steps (``vdm.train``) are written once. Their cross-device
operations go through a ``Reductions``:

- ``PMAP``: the step sees one device's share of the global batch inside
  ``jax.pmap(axis_name="batch")``; means, sums and gathers are the collectives
  ``lax.pmean`` / ``lax.psum`` / ``lax.all_gather`` and a device's examples are
  ``axis_index * b ... (axis_index + 1) * b - 1`` of the global batch.
- ``mesh_reductions``: the step sees the global batch, as one ``jax.jit`` over a
  ``jax.sharding.Mesh`` with axes (``data``, ``fsdp``); the arrays are global
  ``jax.Array`` s sharded over the devices, the reductions are plain means and
  sums of the global batch and XLA's partitioner inserts the collectives.

Both compute the mean over the global batch of per-example losses whose keys
come from (seed, step, global example index), so they give the same numbers. (Not
with dropout > 0: ``vdm.build`` draws one dropout key per shard, from the shard's
first example index, so the masks differ between modes, as between pmap device
counts.)

Parameter sharding (``train.fsdp`` = F > 1): every parameter, EMA parameter and
optimiser-state array with at least ``train.fsdp_min_size`` elements is split over
the ``fsdp`` axis along its largest dimension divisible by F (ties: the later
dimension); smaller arrays, the step, the RNG and the loss history are replicated.
The batch is split over both axes (``data`` x ``fsdp`` = all devices), so with
F = devices this is ZeRO-3 / FSDP and with F = 1 plain data parallelism. Inside the
step the gradients are constrained to the parameters' sharding (a reduce-scatter),
so the optimiser update runs on each device's slice only.

Devices are laid out row-major from ``jax.devices()`` (ordered by process), so the
batch rows of process p are one contiguous block, the one ``vdm.data`` gives it.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

PMAP_AXIS = "batch"
MESH_AXES = ("data", "fsdp")
BATCH_AXES = MESH_AXES  # the batch dimension is split over both mesh axes
PARALLELISMS = ("pmap", "mesh")
SHARDED_STATE_FIELDS = ("params", "ema_params", "opt_state")


class Reductions(NamedTuple):
    """The step's cross-device operations (see the module docstring).

    mean / sum: of a pytree over the devices' shares; gather: per-example arrays of all
    shares in global example order; shard_index / num_shards: which share of the global
    batch this is and how many there are; shard_grads: puts gradients in the parameters'
    sharding (identity under pmap).
    """
    mean: Callable
    sum: Callable
    gather: Callable
    shard_index: Callable
    num_shards: Callable
    shard_grads: Callable


PMAP = Reductions(
    mean=lambda tree: jax.lax.pmean(tree, PMAP_AXIS),
    sum=lambda tree: jax.lax.psum(tree, PMAP_AXIS),
    gather=lambda tree: jax.lax.all_gather(tree, PMAP_AXIS, tiled=True),
    shard_index=lambda: jax.lax.axis_index(PMAP_AXIS),
    num_shards=lambda: jax.lax.psum(1, PMAP_AXIS),
    shard_grads=lambda grads: grads,
)


def mesh_reductions(param_shardings=None) -> Reductions:
    """The global-batch reductions of the mesh step; ``param_shardings`` (a pytree of
    NamedShardings like the parameters) constrains the gradients, None leaves them to XLA."""
    identity = lambda tree: tree  # noqa: E731
    if param_shardings is None:
        shard_grads = identity
    else:
        shard_grads = lambda grads: jax.lax.with_sharding_constraint(grads, param_shardings)  # noqa: E731
    return Reductions(mean=identity, sum=identity, gather=identity, shard_index=lambda: 0,
                      num_shards=lambda: 1, shard_grads=shard_grads)


# ---------------------------------------------------------------------------
# The mesh and the sharding rule.
# ---------------------------------------------------------------------------


def make_mesh(fsdp: int, devices=None) -> Mesh:
    """Mesh (data, fsdp) = (devices / fsdp, fsdp) over ``devices`` (default: all, every process)
    in ``jax.devices()`` order, with automatic (jit-propagated) sharding on both axes."""
    devices = list(jax.devices() if devices is None else devices)
    if fsdp < 1 or len(devices) % fsdp:
        raise ValueError(f"config.train.fsdp = {fsdp} must be a positive divisor of the number of devices "
                         f"({len(devices)})")
    grid = np.asarray(devices, dtype=object).reshape(len(devices) // fsdp, fsdp)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def fsdp_spec(shape, fsdp: int, min_size: int) -> P:
    """The sharding rule: split the largest dimension divisible by ``fsdp`` (ties: the later
    one) over the ``fsdp`` axis; replicate arrays under ``min_size`` elements and arrays with
    no divisible dimension."""
    if fsdp == 1 or math.prod(shape) < min_size:
        return P()
    candidates = [(size, d) for d, size in enumerate(shape) if size % fsdp == 0]
    if not candidates:
        return P()
    _, dim = max(candidates)
    return P(*([None] * dim + ["fsdp"]))


def state_shardings(state, mesh: Mesh, min_size: int):
    """NamedShardings of a TrainState: ``fsdp_spec`` for params, EMA params and optimiser
    state (``SHARDED_STATE_FIELDS``), replicated for the rest."""
    fsdp = mesh.shape["fsdp"]
    replicated = jax.tree.map(lambda _: NamedSharding(mesh, P()), state)
    by_rule = lambda tree: jax.tree.map(  # noqa: E731
        lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), fsdp, min_size)), tree)
    return replicated.replace(**{f: by_rule(getattr(state, f)) for f in SHARDED_STATE_FIELDS})


def place(tree, shardings):
    """Host arrays -> global jax.Arrays with ``shardings`` (every process passes the same values
    and puts only its own devices' slices); jax.Arrays are resharded (kept when already placed so,
    as a restore into ``abstract(..., shardings)`` returns them)."""
    def put(x, sharding):
        if isinstance(x, jax.Array):
            return jax.device_put(x, sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
    return jax.tree.map(put, tree, shardings)


def to_host(tree):
    """Numpy copies of (possibly multi-process sharded) arrays; every process must call it."""
    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))
    return jax.tree.map(get, tree)


def abstract(tree, shardings):
    """ShapeDtypeStructs with shardings: the target an Orbax restore fills shard by shard."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)


# ---------------------------------------------------------------------------
# Runners: the training loop's view of a parallelism.
# ---------------------------------------------------------------------------


def replicate(tree, devices=None):
    """Host arrays -> pmap's replicated layout: a leading axis of size len(devices) (default: the
    local devices), one copy per device (``jax.device_put`` with a NamedSharding, in place of the
    deprecated ``device_put_replicated`` behind ``flax.jax_utils.replicate``)."""
    devices = list(jax.local_devices() if devices is None else devices)
    sharding = NamedSharding(Mesh(np.asarray(devices, dtype=object), (PMAP_AXIS,)), P(PMAP_AXIS))
    return jax.tree.map(lambda x: jax.device_put(np.broadcast_to(x, (len(devices),) + np.shape(x)), sharding), tree)


class PmapRunner:
    """``jax.pmap`` over the local devices: the state is replicated with a leading device axis,
    batches are [devices, k, per_device, ...], checkpoints hold one device's copy (host arrays).

    ``steps(reductions)`` is the k-step call ``(state, batches, flag) -> (state, metrics, flag)``
    and ``evals(reductions)`` the eval step (``vdm.train.multi_step`` and ``eval_step``)."""

    name = "pmap"

    def __init__(self, steps: Callable, evals: Callable, devices=None):
        """``devices``: a subset of one process's devices; None: every device of every process
        (each process feeds its local ones; pmap's collectives span the processes)."""
        self.devices = list(jax.local_devices() if devices is None else devices)
        mesh = Mesh(np.asarray(self.devices, dtype=object), (PMAP_AXIS,))
        self._sharding = NamedSharding(mesh, P(PMAP_AXIS))
        self.train = jax.pmap(steps(PMAP), axis_name=PMAP_AXIS, devices=devices)
        self._eval = jax.pmap(evals(PMAP), axis_name=PMAP_AXIS, in_axes=(0, 0, 0, None, None), devices=devices)

    def flag(self, value: int):
        """An int32 scalar the steps carry (``vdm.train.guarded_step``), in this runner's layout."""
        return replicate(np.int32(value), self.devices)

    def read_flag(self, flag) -> int:
        return int(jax.device_get(flag)[0])

    def restore_target(self, host_state):
        return host_state

    def place_state(self, host_state):
        return replicate(host_state, self.devices)

    def place_batches(self, batches: dict) -> dict:
        return {k: jax.device_put(v, self._sharding) for k, v in batches.items()}

    def host_metrics(self, metrics: dict) -> dict:
        return {k: np.asarray(v[0]) for k, v in jax.device_get(metrics).items()}

    def checkpoint_view(self, state):
        return self.host(state)

    def host(self, tree):
        """The first local device's copy, as host arrays (read from that device alone: no
        computation, no collective)."""
        return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data).reshape(x.shape[1:]), tree)

    def draw(self, sample: Callable, ema_params, key, num_samples: int):
        """``num_samples`` of ``sample(params, key)`` on one device of process 0 with its copy of
        the EMA parameters, as host arrays there (None in the other processes)."""
        params = self.host(ema_params)
        return np.asarray(sample(params, key, num_samples=num_samples)) if jax.process_index() == 0 else None

    def eval_sums(self, params, loss_state, batch, rng, index) -> dict:
        sums = jax.device_get(self._eval(params, loss_state, self.place_batches(batch), rng, index))
        return {k: float(v[0]) for k, v in sums.items()}

    def replicated_host_state(self, state):
        return jax.device_get(state)


class MeshRunner:
    """One ``jax.jit`` over a (data, fsdp) mesh: the state lives as global arrays sharded by
    ``state_shardings``, batches are global [k, B, ...] arrays split over both axes, and
    checkpoints are written and restored shard by shard (no gathering to one host)."""

    name = "mesh"

    def __init__(self, steps: Callable, evals: Callable, state_template, mesh: Mesh,
                 fsdp_min_size: int, donate: bool = False):
        """``steps`` / ``evals``: as for ``PmapRunner``."""
        self.mesh = mesh
        self.shardings = state_shardings(state_template, mesh, fsdp_min_size)
        self.replicated = NamedSharding(mesh, P())
        self._rows = NamedSharding(mesh, P(BATCH_AXES))
        self.batch_sharding = NamedSharding(mesh, P(None, BATCH_AXES))
        self.train = jax.jit(steps(mesh_reductions(self.shardings.params)),
                             in_shardings=(self.shardings, self.batch_sharding, self.replicated),
                             out_shardings=(self.shardings, self.replicated, self.replicated),
                             donate_argnums=(0,) if donate else ())
        self._eval = jax.jit(evals(mesh_reductions()), out_shardings=self.replicated)

    def flag(self, value: int):
        return jax.device_put(np.int32(value), self.replicated)

    def read_flag(self, flag) -> int:
        return int(np.asarray(flag.addressable_data(0)))

    def restore_target(self, host_state):
        return abstract(host_state, self.shardings)

    def place_state(self, state):
        return place(state, self.shardings)

    def _global(self, local, sharding, axis: int):
        """This process's rows (a contiguous block of the global batch) -> a global array."""
        shape = list(local.shape)
        shape[axis] *= jax.process_count()
        return jax.make_array_from_process_local_data(sharding, local, tuple(shape))

    def place_batches(self, batches: dict) -> dict:
        """{key: [local devices, k, b, ...]} (the loop's stacked batches) -> [k, B, ...] global."""
        out = {}
        for key, v in batches.items():
            v = np.asarray(v)
            local = np.swapaxes(v, 0, 1).reshape((v.shape[1], v.shape[0] * v.shape[2]) + v.shape[3:])
            out[key] = self._global(local, self.batch_sharding, 1)
        return out

    def host_metrics(self, metrics: dict) -> dict:
        return {k: np.asarray(v.addressable_data(0)) for k, v in metrics.items()}

    def checkpoint_view(self, state):
        return state

    def host(self, tree):
        return to_host(tree)

    def draw(self, sample: Callable, ema_params, key, num_samples: int):
        """``sample(params, key, sharding=...)`` over the whole mesh: the EMA parameters as they are
        sharded, the ``num_samples`` split over every device when they divide evenly (else each
        device draws them all); each example's noise comes from its own key, so the samples equal
        one device's. Every process takes part and gets them all."""
        rows = self._rows if num_samples % self.mesh.size == 0 else self.replicated
        return to_host(sample(ema_params, key, num_samples=num_samples, sharding=rows))

    def eval_sums(self, params, loss_state, batch, rng, index) -> dict:
        """Sums over one eval batch ({key: [local devices, b, ...]}) of the global batch."""
        batch = {k: self._global(np.asarray(v).reshape((-1,) + np.shape(v)[2:]), self._rows, 0)
                 for k, v in batch.items()}
        sums = self._eval(params, loss_state, batch, rng, index)
        return {k: float(np.asarray(v.addressable_data(0))) for k, v in sums.items()}

    def replicated_host_state(self, state):
        """The host state with a leading axis of the local device count, as ``PmapRunner`` keeps it
        (for the non-finite diagnosis, which replays the per-device step under vmap)."""
        n = jax.local_device_count()
        return jax.tree.map(lambda x: np.broadcast_to(x, (n,) + x.shape), to_host(state))


def make_runner(train_cfg, steps: Callable, evals: Callable, state_template):
    """The runner ``train.parallelism`` names (``steps`` / ``evals``: see ``PmapRunner``).

    Refuses ``pmap`` over several CPU processes with more than one device each: under jax 0.10.2
    such a run stalls in about half the launches (one process blocks on its own device after the
    other has finished; tests/test_train.py), while one device per process, or the mesh, runs."""
    if train_cfg.parallelism == "pmap":
        n = jax.local_device_count()
        if jax.process_count() > 1 and n > 1 and jax.default_backend() == "cpu":
            raise ValueError(f"config.train.parallelism = 'pmap' with {jax.process_count()} CPU processes of {n} "
                             "devices each stalls under this jax (CPU collectives); give each process one device, "
                             "or set train.parallelism = 'mesh'")
        return PmapRunner(steps, evals)
    return MeshRunner(steps, evals, state_template, make_mesh(train_cfg.fsdp), train_cfg.fsdp_min_size)


def per_device_bytes(tree, shardings) -> int:
    """Bytes one device holds of ``tree`` placed with ``shardings`` (replicated arrays count whole)."""
    return sum(math.prod(s.shard_shape(np.shape(x))) * np.dtype(x.dtype).itemsize
               for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))
