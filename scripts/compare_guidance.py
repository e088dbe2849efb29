"""Classifier-free guidance against classifier guidance, from two ``evaluate.py`` results.

    python scripts/compare_guidance.py \
        --classifier_free=runs/digits_conditional/eval_cfg_ddim100_n1000.json \
        --classifier=runs/default_cg/eval_cg_ddim100_n1000.json --out=docs/figures/digits_guidance_compare.png

``--classifier_free``: the JSON of ``evaluate.py --guidance_scale=...`` on a class-conditional
model; ``--classifier``: of ``evaluate.py --classifier_workdir=... --classifier_scale=...`` on an
unconditional one. Prints one markdown table (accuracy with its binomial standard error, the
classifier Fréchet distance) and draws accuracy and FD against the scale, one line per kind.
The scales are each method's own: w of (1 + w) eps(x, y) - w eps(x), and s of
eps - s sigma grad log p(y | x_t); classifier guidance at s = 1 + w equals classifier-free
guidance at w for exact models (tests/test_classifier_guidance.py).
"""
import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vdm import cli  # noqa: E402  (after the path insert)

_CFG = flags.DEFINE_string("classifier_free", None, "evaluate.py JSON with a 'guidance' sweep.", required=True)
_CG = flags.DEFINE_string("classifier", None, "evaluate.py JSON with a 'classifier_guidance' sweep.", required=True)
_OUT = flags.DEFINE_string("out", "guidance_compare.png", "Figure path.")


def load_rows(path: str, key: str) -> list:
    """The sweep rows of an evaluate.py JSON as {guidance, scale, accuracy, accuracy_stderr,
    classifier_fd, num_samples}."""
    with open(path) as f:
        result = json.load(f)
    if key not in result:
        raise app.UsageError(f"{path} has no {key!r} sweep (keys: {sorted(result)})")
    if key == "guidance":
        return [dict(guidance="classifier-free (w)", scale=r["guidance_scale"], accuracy=r["accuracy"],
                     accuracy_stderr=r["accuracy_stderr"], classifier_fd=r["classifier_fd"],
                     num_samples=r["num_samples"]) for r in result[key]["rows"]]
    return [dict(guidance="classifier (s)", scale=r["scale"], accuracy=r["accuracy"],
                 accuracy_stderr=r["accuracy_stderr"], classifier_fd=r["classifier_fd"],
                 num_samples=r["num_samples"]) for r in result[key]]


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    from vdm import viz

    rows = load_rows(_CFG.value, "guidance") + load_rows(_CG.value, "classifier_guidance")
    print("| guidance | scale | samples | accuracy | classifier FD |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['guidance']} | {r['scale']:g} | {r['num_samples']} | {r['accuracy']:.3f} ± "
              f"{r['accuracy_stderr']:.3f} | {r['classifier_fd']:.1f} |")
    path = viz.plot_ablation(_OUT.value, rows, ["accuracy", "classifier_fd"], label="guidance", x="scale",
                             title="guided samples: accuracy and classifier FD vs scale")
    print(f"wrote {path}")


if __name__ == "__main__":
    cli.run(main)
