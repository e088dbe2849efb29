"""The default run (`python scripts/train.py`): DDPM on the embedded 8x8 digits.

The same experiment as configs/digits.py, whose docstring gives the details.
"""
from vdm import config as config_lib


def get_config():
    return config_lib.defaults()
