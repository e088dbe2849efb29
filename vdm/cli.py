"""The scripts' command-line boundary: quiet start-up and one-line usage errors.

``quiet_startup()`` runs before TensorFlow is imported and silences its start-up
notices (the oneDNN notice, C++ INFO/WARNING lines); ``run`` lowers absl's logging
to WARNING. Both are skipped when ``VDM_VERBOSE=1`` is set or ``--verbosity`` is given.
``run(main)`` is ``absl.app.run`` whose flag-parsing errors and ``app.UsageError``s
print one line, ``<script>: error: <message>``, and exit with status 2 (the
convention of argparse and of Unix tools for bad usage). ``usage_errors()`` turns
the ``ValueError`` / ``FileNotFoundError`` of config validation and run loading
into usage errors; it wraps those calls only, so a failure inside training keeps
its traceback.
"""
from __future__ import annotations

import contextlib
import os
import sys

USAGE_EXIT_CODE = 2


def verbose() -> bool:
    """True when start-up logs were asked for: ``VDM_VERBOSE=1`` or a ``--verbosity`` flag."""
    return os.environ.get("VDM_VERBOSE") == "1" or any(a.startswith(("--verbosity", "-v=")) for a in sys.argv)


def quiet_startup(tensorflow: bool = True) -> None:
    """Silence TensorFlow's start-up lines; call before TensorFlow is first imported.

    ``TF_CPP_MIN_LOG_LEVEL=2`` filters TensorFlow's C++ INFO and WARNING logs, but the
    oneDNN notice and absl's "before absl::InitializeLog()" line are written to file
    descriptor 2 while TensorFlow loads, before that filter exists; with ``tensorflow``
    the import therefore runs here with descriptor 2 sent to /dev/null (an import error
    still raises). Scripts that never import TensorFlow pass ``tensorflow=False``.
    """
    if verbose():
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not tensorflow:
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _fail(message: str):
    print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
    sys.exit(USAGE_EXIT_CODE)


def _no_field(error: Exception, argv) -> None:
    """The usage error of a ``--config.a.b=v`` override that names no field of the config."""
    name = str(error).strip("\"'").split("'")[0]
    given = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.") and name in a]
    _fail(f"{given[0] if given else '--config'}: the config has no field {name!r}")


def define_config_file(name: str, default: str | None, help_string: str, lock_config: bool):
    """``config_flags.DEFINE_config_file``. With a default file, ml_collections applies the
    ``--config.*`` overrides of ``sys.argv`` right here, so an override naming no field is
    reported here too (as ``run`` reports it for a ``--config`` given on the command line)."""
    from ml_collections import config_flags

    try:
        return config_flags.DEFINE_config_file(name, default, help_string, lock_config=lock_config)
    except (AttributeError, KeyError) as e:
        _no_field(e, sys.argv)


@contextlib.contextmanager
def usage_errors():
    """Re-raise ``ValueError`` and ``FileNotFoundError`` as ``app.UsageError`` (the message kept)."""
    from absl import app

    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        raise app.UsageError(str(e)) from e


def run(main) -> None:
    """``app.run(main)`` with one-line usage errors (exit status 2) and absl INFO logs off."""
    from absl import app, flags, logging

    def parse(argv):
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            _fail(str(e))
        except (AttributeError, KeyError) as e:
            _no_field(e, argv)

    def wrapped(argv):
        if not verbose():
            logging.set_verbosity(logging.WARNING)  # library INFO logs (Orbax) would drown the output
        try:
            return main(argv)
        except app.UsageError as e:
            _fail(str(e))

    app.run(wrapped, flags_parser=parse)
