"""The default run (`python scripts/train.py`): configs/digits.py, whose docstring gives the details."""
from configs.digits import get_config  # noqa: F401  (the config file's entry point)
