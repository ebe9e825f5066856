"""Command line entry point: ``python -m moejax.main --config=experiments/default.py --workdir=DIR``.

Any config key can be set on the command line (``--config.num_train_steps=100``,
``--config.moe.num_experts=16``, ``--config.moe.gmm_backend=reference``), also keys the config file
leaves at their default; a key the trainer does not know is an error that names the closest one.
All the work happens in :func:`moejax.train.run`; invalid settings end the program with a one-line
message (exit code 2).
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from moejax import train

# New keys are accepted here so that any MoEConfig / TransformerConfig field can be set from the
# command line; train.run rejects keys it does not know (with the closest known one).
_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (get_config()).",
                                          lock_config=False, accept_new_attributes=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
flags.mark_flags_as_required(["config", "workdir"])


def _parse_flags(argv):
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError, ValueError) as error:  # a --config.* override cannot apply
        sys.exit(f"error: {error}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    # orbax logs every checkpoint step at INFO; the run's own progress goes to the terminal.
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    try:
        train.run(_CONFIG.value, _WORKDIR.value)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
