"""Train the noise-conditional classifier of classifier guidance (vdm.noisy_classifier_train).

    python scripts/train_classifier.py --config=configs/digits_classifier.py --workdir=runs/digits_classifier
    python scripts/sample.py --workdir=runs/default --classifier_workdir=runs/digits_classifier \
        --label=3 --classifier_scale=2

The config's ``diffusion`` section is the forward process the classifier is trained under
(copy the diffusion run's). Rerunning with the same --workdir resumes from its latest
checkpoint. Writes config.json, classifier.json, checkpoints/, metrics.jsonl and TensorBoard
events, and prints the held-out accuracy at ``eval.num_levels`` noise levels every
``eval.every`` steps. The config is validated before anything compiles.
"""
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vdm import cli  # noqa: E402  (after the path insert)

cli.quiet_startup()

_CONFIG = cli.define_config_file("config", "configs/digits_classifier.py", "Classifier config file.",
                                 lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/digits_classifier", "Directory for checkpoints and logs.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    from vdm import noisy_classifier_train

    with cli.usage_errors():
        noisy_classifier_train.validate_config(_CONFIG.value)
    noisy_classifier_train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    cli.run(main)
