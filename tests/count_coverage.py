"""How much of the config space and of the script flags the tests exercise (issue 19's counts).

    python tests/count_coverage.py RUNS_ROOT [TESTS_DIR]

Config fields and allowed values are counted over the runs the training loop
actually made: every workdir/config.json (``train_and_evaluate`` writes one per
run) under RUNS_ROOT, e.g. a pytest ``--basetemp`` after running the suite.
A field is exercised when some run gives it a value other than the default of
``vdm.config.defaults()`` (its model fields: the default's, or a preset's when
the run names another network); an allowed value (of a field with a fixed
choice list, booleans included) when some run uses it. Script flags are
counted statically: a flag of scripts/*.py (absl DEFINE_* or argparse
add_argument) is exercised when ``--name`` appears in a file of TESTS_DIR.
Prints the three shares and the lists of what no run or test reaches.
"""
import glob
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def allowed_values() -> dict:
    """{field path: allowed values} of the fields with a fixed choice list."""
    from vdm import config as config_lib
    from vdm import bounds, data, diffusion, losses, models, parallel, samplers, schedules

    choices = {
        "data.source": data.SOURCES, "model.name": tuple(models.NETWORKS), "model.dtype": ("float32", "bfloat16"),
        "diffusion.time": config_lib.TIMES, "diffusion.parameterization": diffusion.PARAMETERIZATIONS,
        "diffusion.variance": diffusion.VARIANCE_TYPES, "diffusion.time_input": config_lib.TIME_INPUTS,
        "diffusion.schedule": tuple(dict.fromkeys(schedules.DISCRETE_SCHEDULES + config_lib.CONTINUOUS_SCHEDULES)),
        "loss.name": losses.LOSS_KINDS + ("vdm",), "loss.loss_type": losses.LOSS_TYPES,
        "loss.weighting": losses.WEIGHTINGS, "loss.target": ("",) + diffusion.PARAMETERIZATIONS,
        "loss.decoder": ("auto",) + losses.VDM_DECODERS, "optim.decay": config_lib.DECAYS,
        "eval.elbo": bounds.EVAL_METHODS, "sample.sampler": samplers.SAMPLERS,
        "sample.spacing": samplers.DISCRETE_SPACINGS, "train.parallelism": parallel.PARALLELISMS,
    }
    for path, value in _leaves(config_lib.defaults().to_dict()).items():
        if isinstance(value, bool):
            choices[path] = (False, True)
    return choices


def _leaves(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) and k != "schedule_kwargs":
            out.update(_leaves(v, path + "."))
        else:
            out[path] = v
    return out


def _norm(v):
    return tuple(v) if isinstance(v, list) else v


def config_coverage(runs_root: str) -> dict:
    from vdm import config as config_lib
    from vdm.models import presets

    default = _leaves(config_lib.defaults().to_dict())
    fields = set(default)
    model_defaults = {}
    for fn in presets.PRESETS.values():
        section = fn().to_dict()
        fields |= {f"model.{k}" for k in section}
        model_defaults.setdefault(section["name"], {f"model.{k}": v for k, v in section.items()})
    runs = []
    for path in glob.glob(os.path.join(runs_root, "**", "config.json"), recursive=True):
        with open(path) as f:
            runs.append(_leaves(json.load(f)))
    changed, used = set(), {}
    for run in runs:
        base = dict(default, **model_defaults.get(run.get("model.name"), {}))
        base["model.name"] = default["model.name"]
        for k, v in run.items():
            used.setdefault(k, set()).add(repr(_norm(v)))
            if k not in base or _norm(base[k]) != _norm(v):
                changed.add(k)
    choices = allowed_values()
    values = {(k, v) for k, vs in choices.items() for v in vs}
    hit = {(k, v) for k, v in values if repr(v) in used.get(k, set())}
    return {"runs": len(runs), "fields": (len(changed & fields), len(fields)), "missed_fields": sorted(fields - changed),
            "values": (len(hit), len(values)), "missed_values": sorted(values - hit, key=repr)}


def script_flags() -> dict:
    """{script: [flag names]} of scripts/*.py."""
    out = {}
    for path in sorted(glob.glob(os.path.join(ROOT, "scripts", "*.py"))):
        text = open(path).read()
        names = re.findall(r"DEFINE_\w+\(\s*\"(\w+)\"", text) + re.findall(r"add_argument\(\s*\"--([\w-]+)\"", text)
        out[os.path.basename(path)] = names
    return out


def flag_coverage(tests_dir: str) -> dict:
    text = "".join(open(p).read() for p in glob.glob(os.path.join(tests_dir, "*.py")))
    flags = [(s, f) for s, names in script_flags().items() for f in names]
    hit = [(s, f) for s, f in flags if re.search(rf"--{re.escape(f)}\b", text)]
    return {"flags": (len(hit), len(flags)), "missed_flags": sorted(set(flags) - set(hit))}


def main(runs_root: str, tests_dir: str = os.path.join(ROOT, "tests")):
    c, f = config_coverage(runs_root), flag_coverage(tests_dir)
    share = lambda a, b: f"{a} of {b} ({100 * a / b:.0f}%)"
    print(f"{c['runs']} training runs under {runs_root}")
    print(f"config fields exercised end to end: {share(*c['fields'])}")
    print(f"allowed values exercised end to end: {share(*c['values'])}")
    print(f"script flags passed by a test: {share(*f['flags'])}")
    print("fields never changed:", ", ".join(c["missed_fields"]))
    print("values never used:", ", ".join(f"{k}={v!r}" for k, v in c["missed_values"]))
    print("flags never passed:", ", ".join(f"{s} --{n}" for s, n in f["missed_flags"]))


if __name__ == "__main__":
    main(*sys.argv[1:])
