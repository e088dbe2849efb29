"""Train the noise-conditional classifier of classifier guidance (vdm.noisy_classifier_train).

    python scripts/train_classifier.py --config=configs/classifier/digits.py --workdir=runs/digits_classifier
    python scripts/sample.py --workdir=runs/default --classifier_workdir=runs/digits_classifier \
        --label=3 --classifier_scale=2

The config's ``diffusion`` section is the forward process the classifier is trained under
(copy the diffusion run's). Rerunning with the same --workdir resumes from its latest
checkpoint. Training writes config.json, classifier.json, checkpoints/, metrics.jsonl and
TensorBoard events, and prints the held-out accuracy at ``eval.num_levels`` noise levels every
``eval.every`` steps. The config is validated before anything compiles. ``--evaluate`` prints
the latest checkpoint's accuracy against noise level (``--num_levels`` levels, ``--num_draws``
noise draws per held-out example) and writes <workdir>/accuracy_vs_noise.json.
"""
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vdm import cli  # noqa: E402  (after the path insert)

cli.quiet_startup()

_CONFIG = cli.define_config_file("config", "configs/classifier/digits.py", "Classifier config file.",
                                 lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/digits_classifier", "Directory for checkpoints and logs.")
_EVALUATE = flags.DEFINE_bool("evaluate", False, "Do not train: print the latest checkpoint's held-out accuracy "
                              "against noise level and write <workdir>/accuracy_vs_noise.json.")
_NUM_LEVELS = flags.DEFINE_integer("num_levels", 11, "--evaluate: noise levels, evenly spread over training's.")
_NUM_DRAWS = flags.DEFINE_integer("num_draws", 10, "--evaluate: noise draws per held-out example and level.")


def evaluate(workdir):
    """--evaluate: the accuracy-vs-noise table of a trained classifier."""
    import json

    from vdm import noisy_classifier_train

    with cli.usage_errors():
        rows = noisy_classifier_train.evaluate_classifier(workdir, _NUM_LEVELS.value, _NUM_DRAWS.value)
    print(f"| t | log-SNR | accuracy | stderr |  ({rows[0]['num_examples']} held-out examples x "
          f"{rows[0]['num_draws']} noise draws)")
    for r in rows:
        print(f"| {r['t']:g} | {r['log_snr']:.2f} | {r['accuracy']:.3f} | {r['stderr']:.3f} |")
    path = os.path.join(workdir, "accuracy_vs_noise.json")
    with open(path, "w") as f:
        json.dump(rows, f, indent=2)
    print(f"wrote {path}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    from vdm import noisy_classifier_train

    if _EVALUATE.value:
        return evaluate(_WORKDIR.value)
    with cli.usage_errors():
        noisy_classifier_train.validate_config(_CONFIG.value)
    noisy_classifier_train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    cli.run(main)
