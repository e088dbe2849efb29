"""Run a grid of config overrides, each to a fixed step count, and tabulate the results.

    python scripts/ablate.py --config=configs/digits.py --workdir=runs/ablate_param --steps=2000 --elbo=exact,mc
    python scripts/ablate.py --config=configs/digits.py --workdir=runs/ablate_pw \
        --grid=parameterization=eps,v --grid=loss.weighting=none,min_snr --parallel=2
    python scripts/ablate.py --config=configs/digits.py --workdir=runs/x --grid=diffusion.variance \
        --config.loss.name=hybrid --config.train.batch_size=64 --eval_flag=--sampling_steps=100 --eval_flag=--sampler=ddim

Each ``--grid`` is one axis, ``FIELD`` or ``FIELD=v1,v2,...``: a config field
path (``loss.weighting``; a bare name is looked up in the diffusion and loss
sections) and its values, tuples in brackets (``model.fourier_exponents=(1,2),()``;
default for parameterization / variance / weighting: every allowed value).
Fields joined by ``;`` in one ``--grid`` vary together:
``--grid='loss.name=simple,hybrid;diffusion.variance=fixed_large,learned_range'``
is two runs. The runs are the cross product of the axes (default:
``parameterization`` = eps, x0, v, score). Every overridden config is
validated before anything trains.

Each run trains with ``scripts/train.py`` in ``<workdir>/<name>/`` (the
config file plus the axis values and ``--steps`` as ``--config.*`` flags, and
every ``--config.*`` flag given here), then ``scripts/evaluate.py
--sample_metrics`` writes its ``eval_test.json``; a run that has one is
skipped, and a run killed midway resumes from its checkpoint. Runs go one
after another, or ``--parallel N`` at a time as separate processes.

Writes ``<workdir>/results.md``, ``results.csv`` (name, axis values, final
loss, -ELBO of each ``--elbo`` estimate with its standard error, sample metric,
steps/s) and ``results.png`` (``vdm.viz.plot_ablation``).
"""
import ast
import csv
import itertools
import json
import os
import subprocess
import sys
import time

from absl import app, flags
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vdm import cli  # noqa: E402  (after the path insert)

cli.quiet_startup(tensorflow=False)

_CONFIG = cli.define_config_file("config", "configs/digits.py", "Base config file.", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the ablation (one subdirectory per run).",
                               required=True)
_GRID = flags.DEFINE_multi_string("grid", ["parameterization"], "An axis: FIELD or FIELD=v1,v2,... "
                                  "(repeat the flag to cross axes; join FIELD=... parts with ';' to vary "
                                  "them together).")
_STEPS = flags.DEFINE_integer("steps", 2000, "Training steps of every run.")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Runs at a time (each in its own process).")
_EVAL_FLAGS = flags.DEFINE_multi_string("eval_flag", [], "Extra flags for scripts/evaluate.py, e.g. "
                                        "--eval_flag=--sampling_steps=100.")
_NUM_GENERATED = flags.DEFINE_integer("num_generated", 500, "Samples per run for the sample metric.")
_ELBO = flags.DEFINE_list("elbo", ["mc"], "ELBO estimates of every run (scripts/evaluate.py --elbo): "
                          "mc, exact (discrete time: the sum over all T terms) or both.")

SHORT_SECTIONS = ("diffusion", "loss")
RESULT_FILE = "eval_test.json"


def default_values(field: str) -> list:
    """Every allowed value of the fields with a fixed choice list."""
    from vdm import diffusion, losses

    defaults = {"diffusion.parameterization": diffusion.PARAMETERIZATIONS,
                "diffusion.variance": diffusion.VARIANCE_TYPES,
                "loss.weighting": losses.WEIGHTINGS}
    if field not in defaults:
        raise app.UsageError(f"--grid={field}: give the values (FIELD=v1,v2,...); defaults exist only "
                             f"for {sorted(defaults)}")
    return list(defaults[field])


def resolve_field(config, name: str) -> str:
    """A field path in the config: as given if it has a dot, else looked up in SHORT_SECTIONS."""
    if "." in name:
        node = config
        for part in name.split("."):
            if part not in node:
                raise app.UsageError(f"--grid: config has no field {name!r}")
            node = node[part]
        return name
    hits = [f"{s}.{name}" for s in SHORT_SECTIONS if name in config[s]]
    if not hits:
        raise app.UsageError(f"--grid={name}: no field {name!r} in the sections {SHORT_SECTIONS}; "
                             f"give the full path, e.g. model.{name}")
    if len(hits) > 1:
        raise app.UsageError(f"--grid={name} is ambiguous ({hits}); give the full path")
    return hits[0]


def parse_value(text: str, current):
    """A grid value with the type of the config's current value (str, bool, int or float)."""
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not type(current):
        raise app.UsageError(f"--grid: {text!r} is not a {type(current).__name__} like the config's {current!r}")
    return value


def split_values(text: str) -> list:
    """'a,b,(1, 2),()' -> ['a', 'b', '(1, 2)', '()']: commas inside brackets stay (tuple values)."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        depth += (c in "([") - (c in ")]")
        if c == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


def get_field(config, path: str):
    node = config
    for part in path.split("."):
        node = node[part]
    return node


def parse_axes(config, specs):
    """[(field paths, [value tuples])] from the --grid flags; ';' links fields into one axis."""
    axes = []
    for spec in specs:
        fields, columns = [], []
        for part in spec.split(";"):
            name, sep, values = part.partition("=")
            field = resolve_field(config, name)
            current = get_field(config, field)
            columns.append([parse_value(v, current) for v in split_values(values)] if sep
                           else default_values(field))
            if field in fields or any(field in f for f, _ in axes):
                raise app.UsageError(f"--grid: {field} given twice")
            fields.append(field)
        if len({len(c) for c in columns}) > 1:
            raise app.UsageError(f"--grid={spec}: linked fields need the same number of values, got "
                                 f"{[len(c) for c in columns]}")
        axes.append((tuple(fields), list(zip(*columns))))
    return axes


def run_name(point) -> str:
    """Directory name of a grid point, e.g. 'parameterization=eps__weighting=none'."""
    return "__".join(f"{field.split('.')[-1]}={value}" for field, value in point)


def step_overrides(config, steps: int) -> dict:
    """Train every run to ``steps``: evaluate and checkpoint once, at the end."""
    k = config.train.steps_per_call
    if steps % k:
        raise app.UsageError(f"--steps={steps} must be a multiple of train.steps_per_call = {k}")
    log_every = max(k, (min(config.train.log_every, steps) // k) * k)
    while steps % log_every:
        log_every -= k
    return {"train.num_steps": steps, "train.checkpoint_every": steps, "eval.every": steps,
            "train.log_every": log_every, "sample.num_samples": 0}


def run_config(base, overrides: dict):
    """A copy of ``base`` with ``overrides`` {field path: value}, validated."""
    from vdm import config as config_lib

    config = base.copy_and_resolve_references()
    for path, value in overrides.items():
        *parents, leaf = path.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    config_lib.validate(config)
    return config


def forwarded_config_flags(argv) -> list:
    """The --config.* overrides of this command line, for every run's train.py."""
    return [a for a in argv[1:] if a.startswith("--config.")]


def commands(config_file: str, overrides: dict, run_dir: str, config_flags_: list) -> list:
    """The train and evaluate command lines of one run."""
    py = sys.executable
    train = [py, os.path.join(ROOT, "scripts", "train.py"), f"--config={config_file}", f"--workdir={run_dir}"]
    train += config_flags_ + [f"--config.{p}={v}" for p, v in overrides.items()]
    evaluate = [py, os.path.join(ROOT, "scripts", "evaluate.py"), f"--workdir={run_dir}",
                f"--elbo={','.join(_ELBO.value)}",
                "--sample_metrics", f"--num_generated={_NUM_GENERATED.value}"] + list(_EVAL_FLAGS.value)
    return [train, evaluate]


def run_one(cmds, run_dir: str):
    """A shell line running a run's commands one after the other, logging to run_dir/log.txt."""
    import shlex

    os.makedirs(run_dir, exist_ok=True)
    line = " && ".join(" ".join(shlex.quote(c) for c in cmd) for cmd in cmds)
    log = open(os.path.join(run_dir, "log.txt"), "a")
    return subprocess.Popen(["bash", "-c", line], stdout=log, stderr=subprocess.STDOUT), log


def collect(run_dir: str, point) -> dict:
    """One table row from a finished run's metrics.jsonl and eval_test.json."""
    from vdm import viz

    records = viz.read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    losses = [r for r in records if "loss" in r]
    rates = [r["steps_per_sec"] for r in losses[1:]] or [r["steps_per_sec"] for r in losses]
    with open(os.path.join(run_dir, RESULT_FILE)) as f:
        ev = json.load(f)
    row = {"name": run_name(point), **{field.split(".")[-1]: value for field, value in point}}
    row["final_loss"] = losses[-1]["loss"]
    for kind, elbo in ev["elbo"].items():  # "exact" and/or "mc"
        total = elbo["terms"]["total"]
        unit = "bpd" if elbo["unit"].startswith("bits/dim") else "nats"  # dequantized: 8-bit scale
        row[f"nelbo_{unit}_{kind}"] = total["mean"]
        row[f"nelbo_{unit}_{kind}_se"] = total["stderr"]
    if "estimator_variance" in ev:  # scripts/evaluate.py --estimator_variance_draws
        row["estimator_var"] = ev["estimator_variance"]["terms"]["total"]["mean"]
        row["estimator_var_se"] = ev["estimator_variance"]["terms"]["total"]["stderr"]
    samples = (ev.get("samples") or [{}])[0]
    for metric in ("classifier_fd", "fid", "mmd", "sliced_wasserstein"):
        if metric in samples:
            row[metric] = samples[metric]
    row["steps_per_s"] = sum(rates) / len(rates)
    return row


def fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_tables(workdir: str, rows: list, axis_names: list) -> list:
    from vdm import viz

    columns = list(dict.fromkeys(k for r in rows for k in r))
    md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    paths = [os.path.join(workdir, "results.md"), os.path.join(workdir, "results.csv")]
    with open(paths[0], "w") as f:
        f.write("\n".join(md) + "\n")
    with open(paths[1], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    metrics = [c for c in columns if c in ("final_loss", "classifier_fd", "fid", "mmd", "sliced_wasserstein",
                                            "estimator_var", "steps_per_s") or (c.startswith("nelbo_") and not c.endswith("_se"))]
    labelled = [{**r, "run": " / ".join(str(r[a]) for a in axis_names)} for r in rows]
    paths.append(viz.plot_ablation(os.path.join(workdir, "results.png"), labelled, metrics, label="run",
                                   title=os.path.basename(os.path.normpath(workdir))))
    print("\n".join(md))
    return paths


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    base, workdir = _CONFIG.value, _WORKDIR.value
    config_file = config_flags.get_config_filename(flags.FLAGS["config"])
    if _PARALLEL.value < 1:
        raise app.UsageError(f"--parallel={_PARALLEL.value} must be >= 1")
    axes = parse_axes(base, _GRID.value)
    fixed = step_overrides(base, _STEPS.value)
    points = [tuple(fv for (fields, _), values in zip(axes, combo) for fv in zip(fields, values))
              for combo in itertools.product(*[v for _, v in axes])]
    if not _ELBO.value or set(_ELBO.value) - {"exact", "mc"}:
        raise app.UsageError(f"--elbo={','.join(_ELBO.value)}: give mc, exact or both")
    for point in points:  # every config is checked before anything trains
        try:
            config = run_config(base, {**fixed, **dict(point)})
        except ValueError as e:
            raise app.UsageError(f"run {run_name(point)}: {e}")
        if ("exact" in _ELBO.value and config.diffusion.time != "discrete" and config.diffusion.T < 1
                and not any(f.startswith("--exact_T=") for f in _EVAL_FLAGS.value)):
            raise app.UsageError(f"run {run_name(point)}: --elbo=exact needs discrete time, a T-step "
                                 f"continuous model (diffusion.T > 0) or --eval_flag=--exact_T=T; "
                                 f"else use --elbo=mc")

    forwarded = forwarded_config_flags(sys.argv)
    todo = [p for p in points if not os.path.exists(os.path.join(workdir, run_name(p), RESULT_FILE))]
    print(f"{len(points)} runs, {len(points) - len(todo)} already finished; {_STEPS.value} steps each")
    running = []
    for point in todo:
        while len(running) >= _PARALLEL.value:
            running = wait_some(running)
        run_dir = os.path.join(workdir, run_name(point))
        print(f"start {run_name(point)} (log: {run_dir}/log.txt)", flush=True)
        running.append((point, *run_one(commands(config_file, {**fixed, **dict(point)}, run_dir, forwarded),
                                        run_dir)))
    while running:
        running = wait_some(running)

    rows = [collect(os.path.join(workdir, run_name(p)), p) for p in points]
    for path in write_tables(workdir, rows, [f.split(".")[-1] for fields, _ in axes for f in fields]):
        print(f"wrote {path}")


def wait_some(running: list) -> list:
    """Wait until one of the running processes ends; fail loudly if it failed."""
    while True:
        for item in running:
            point, proc, log = item
            if proc.poll() is not None:
                log.close()
                if proc.returncode:
                    for _, other, _ in running:
                        if other is not proc and other.poll() is None:
                            other.wait()
                    raise RuntimeError(f"run {run_name(point)} failed (exit {proc.returncode}); "
                                       f"see its log.txt")
                print(f"done  {run_name(point)}", flush=True)
                return [r for r in running if r is not item]
        time.sleep(1.0)


if __name__ == "__main__":
    cli.run(main)
