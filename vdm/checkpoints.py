"""Checkpoints and saved runs: the Orbax manager of a workdir, restore, the saved config.

Checkpoints hold the whole TrainState (``vdm.train``); a step directory appears only
once it is complete (Orbax writes into a temporary directory and renames it).
"""
from __future__ import annotations

import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp


def checkpoint_manager(workdir: str, train: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    """Async Orbax manager keeping the last ``train.keep_checkpoints`` steps in workdir/checkpoints.

    Orbax writes a step into a temporary directory and renames it when complete,
    so ``latest_step`` never names a half-written checkpoint.
    """
    options = ocp.CheckpointManagerOptions(max_to_keep=train.keep_checkpoints, create=True,
                                           enable_async_checkpointing=True)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), options=options)


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a training run saved as workdir/config.json."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: pass --config, or a workdir written by scripts/train.py")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def restore_params(workdir: str, train: ml_collections.ConfigDict, step: int = -1, raw: bool = False):
    """(params, step): the EMA (or, with ``raw``, the raw) parameters of checkpoint ``step``
    (-1: the latest), restored as saved (no template needed) and put on the device."""
    manager = checkpoint_manager(workdir, train)
    step = manager.latest_step() if step < 0 else step
    if step is None or step not in manager.all_steps():
        raise FileNotFoundError(f"no checkpoint {'' if step is None else step} in {manager.directory}; "
                                f"available steps: {list(manager.all_steps())}")
    state = manager.restore(step, args=ocp.args.StandardRestore())
    manager.close()
    # Orbax returns numpy leaves; device arrays allow traced indexing (per-step heads).
    return jax.device_put(state["params" if raw else "ema_params"]), step


def restore_or_init(manager: ocp.CheckpointManager, init_state, target=None):
    """The latest complete checkpoint if there is one, else ``init_state`` (a host-array
    ``vdm.train.TrainState``).

    ``target`` is the tree the checkpoint is restored into: host arrays (default:
    ``init_state``), or ``jax.ShapeDtypeStruct`` s with shardings (``vdm.parallel.abstract``),
    which Orbax fills shard by shard, each process reading only its devices' slices, on any
    mesh (the saved arrays' device count and sharding do not matter).
    """
    step = manager.latest_step()
    if step is None:
        return init_state
    return manager.restore(step, args=ocp.args.StandardRestore(init_state if target is None else target))
