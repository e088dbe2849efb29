"""Train a diffusion model from a config file.

    python scripts/train.py --config=configs/default.py --workdir=runs/digits
    python scripts/train.py --config=configs/mnist.py --workdir=runs/mnist \
        --config.diffusion.parameterization=x0 --config.train.num_steps=20000

Rerunning with the same --workdir resumes from its latest checkpoint. The
config is validated before anything compiles. Multi-host: set
--config.train.distributed=True on every process (plus coordinator_address,
num_processes and process_id where the cluster does not provide them).
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Training config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Directory for checkpoints, logs and samples.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # library INFO logs (Orbax) would drown the progress lines
    from vdm import train  # after flag parsing: start-up errors about flags come first

    train.setup_distributed(_CONFIG.value.train)
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
