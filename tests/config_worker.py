"""Runs the tiny config runs of tests/test_configs.py in one fresh process.

    python tests/config_worker.py RUNS.json RESULTS.json WORKROOT

RUNS.json is a list of {"name", "config": a configs/ file name or "matrix",
"overrides": {"section.field": value}, "delete": [fields to remove], "resume": bool}. Each run gets the
generic tiny override (``tiny``), then its own overrides, and is validated; a
ValueError is recorded as a refusal with its message. A valid run trains 2
steps (checkpoint, evaluation, a sample grid) and, with ``resume``, reruns
to 4 steps in the same workdir. TFDS configs read ``tfds.testing.mock_data``.
The result of each run is {"status": "refused" | "ok" | "error", "message",
"resumed_from", "checkpoints", "samples", "eval_bpd"}.

XLA compiles at a low optimisation level (set below, before JAX starts), and the
persistent compilation cache lets a resumed run reuse its first run's compiles.
"""
import importlib.util
import json
import os
import re
import sys
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tests.conftest import FAST_COMPILE  # noqa: E402  (after the path insert)

FAST_XLA = f"--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true {FAST_COMPILE}"
T = 50  # the smallest T at which the linear schedule's 1000/T rescaling keeps betas < 1


def load_config(name: str):
    """get_config() of configs/<name>."""
    spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(ROOT, "configs", name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


TINY_MODELS = {
    "unet": dict(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_groups=4),
    "vdm": dict(ch=8, num_blocks=1, num_groups=4),
    "mlp": dict(hidden=16, depth=1, embed_dim=8),
    "per_step_heads": dict(hidden=16, num_steps=T),
    "mean_var_nets": dict(hidden=4),
}


def tiny(config):
    """The generic tiny override of any config: a small network, T = 20 (a continuous-time
    config keeps T = 0), 2 steps of batch 4, one checkpoint and one evaluation at step 2,
    4 samples with at most 5 sampling steps."""
    config.model.update(TINY_MODELS[config.model.name])
    if config.diffusion.time == "discrete" or config.diffusion.T:
        config.diffusion.T = T
    k = 2 if config.train.steps_per_call > 1 else 1
    config.train.update(dict(num_steps=2, batch_size=4, steps_per_call=k, log_every=k, checkpoint_every=2,
                             keep_checkpoints=2))
    config.optim.warmup_steps = 1
    config.eval.update(dict(every=2, batch_size=4, num_batches=1, elbo_samples=2, elbo_chunk=T))
    steps = config.sample.num_steps
    config.sample.update(dict(num_samples=4, num_steps=min(steps, 5) if steps else 0))
    if config.data.source == "folder":
        config.data.update(dict(image_size=8, num_test=2))
    if config.data.source == "toy":
        config.data.num_test = 8
    return config


def apply(config, overrides: dict, delete=()):
    """Set {"section.field": value} (JSON lists become tuples), then remove the ``delete`` fields."""
    for path, value in overrides.items():
        section, field = path.split(".")
        config[section][field] = tuple(value) if isinstance(value, list) else value
    for path in delete:
        section, field = path.split(".")
        del config[section][field]
    return config


def run_one(run: dict, workroot: str) -> dict:
    import tensorflow_datasets as tfds

    from vdm import config as config_lib
    from vdm import train

    base = load_config(run["config"] if run["config"] != "matrix" else "default.py")
    config = apply(tiny(base), run["overrides"], run.get("delete", ()))
    try:
        config_lib.validate(config)
    except ValueError as e:
        return {"status": "refused", "message": str(e)}
    workdir = os.path.join(workroot, run["name"])
    out = {"status": "ok"}
    try:
        with tfds.testing.mock_data(num_examples=8, policy=tfds.testing.MockPolicy.USE_CODE):
            train.train_and_evaluate(config, workdir)
            if run.get("resume"):
                config.train.num_steps = config.eval.every = 4
                config.train.checkpoint_every = 4
                log = os.path.join(workdir, "resume.log")
                with open(log, "w") as f:
                    stdout, sys.stdout = sys.stdout, f
                    try:
                        train.train_and_evaluate(config, workdir)
                    finally:
                        sys.stdout = stdout
                with open(log) as f:
                    m = re.search(r"resumed from step (\d+)", f.read())
                out["resumed_from"] = int(m.group(1)) if m else None
    except Exception as e:  # recorded: the test names the run and shows the traceback
        return {"status": "error", "message": f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"}
    ckpt = os.path.join(workdir, "checkpoints")
    out["checkpoints"] = sorted(int(n) for n in os.listdir(ckpt) if n.isdigit())
    out["samples"] = sorted(os.listdir(os.path.join(workdir, "samples")))
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    out["eval_bpd"] = [r["eval_bpd"] for r in records if "eval_bpd" in r]
    return out


def main(runs_path, results_path, workroot):
    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.join(workroot, "xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    with open(runs_path) as f:
        runs = json.load(f)
    results = {}
    for run in runs:
        results[run["name"]] = run_one(run, workroot)
        with open(results_path, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    os.environ["XLA_FLAGS"] = FAST_XLA
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main(*sys.argv[1:])
