"""Train a diffusion model from a config file.

    python scripts/train.py --config=configs/default.py --workdir=runs/digits
    python scripts/train.py --config=configs/mnist.py --workdir=runs/mnist \
        --config.diffusion.parameterization=x0 --config.train.num_steps=20000

Rerunning with the same --workdir resumes from its latest checkpoint. The
config is validated before anything compiles. Multi-host: set
--config.train.distributed=True on every process (plus coordinator_address,
num_processes and process_id where the cluster does not provide them).
A config or flag error prints one line and exits with status 2; VDM_VERBOSE=1
keeps TensorFlow's and absl's start-up logs.
"""
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vdm import cli  # noqa: E402  (after the path insert)

cli.quiet_startup()

_CONFIG = cli.define_config_file("config", "configs/default.py", "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Directory for checkpoints, logs and samples.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    from vdm import config as config_lib
    from vdm import train  # after flag parsing: start-up errors about flags come first

    with cli.usage_errors():
        config_lib.validate(_CONFIG.value)
    train.setup_distributed(_CONFIG.value.train)
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    cli.run(main)
