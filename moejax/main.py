"""Command line entry point: ``python -m moejax.main --config=experiments/default.py --workdir=DIR``.

Any config key can be set on the command line (``--config.num_train_steps=100``,
``--config.moe.gmm_backend=reference``): experiment configs start from the trainer's full schema
(:func:`moejax.trainer.default_config`), and the config is locked, so a key the trainer does not know
is an error. All the work happens in :func:`moejax.trainer.run`; a missing or broken config file and
invalid settings end the program with a one-line message (exit code 2).
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from moejax import paths

from moejax import trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (get_config()).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
flags.mark_flags_as_required(["config", "workdir"])


def _parse_flags(argv):
    paths.config_package_on_path(argv)
    try:
        return flags.FLAGS(argv)
    except Exception as error:  # noqa: BLE001 - a missing/broken config file or a bad override
        sys.exit(f"error: {type(error).__name__}: {paths.error_line(error)}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    # orbax logs every checkpoint step at INFO; the run's own progress goes to the terminal.
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    try:
        config = _CONFIG.value.to_dict()  # a file that failed to load raises here
    except OSError as error:  # the file was missing or failed to load: its last line says why
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        sys.exit(f"error: cannot load --config: {lines[-1] if lines else error}")
    try:
        trainer.run(config, _WORKDIR.value)
    except (ValueError, FloatingPointError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
