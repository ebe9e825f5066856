"""Checkpoints of a training run: one small wrapper around an orbax ``CheckpointManager``.

A checkpoint at step ``S`` (``S`` optimizer steps done) is the directory ``<dir>/<S>`` with three items:

* ``params`` — the model parameters (a pytree of arrays, restored directly onto their shards);
* ``train_state`` — optimizer state and the model's non-parameter state (router biases, tables);
* ``data`` — each process's data-iterator state, one file per process (``process_<i>-of-<n>.b64``),
  so a resumed run reads exactly the batches the interrupted run would have read.

Restoring tries the newest step first. A step that cannot be read (truncated files, missing items)
is reported, renamed to ``<S>.corrupt`` (kept for inspection, never deleted) and the next older step
is tried, so the run loses only the work after that older step.
"""

from __future__ import annotations

import base64
import dataclasses
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath


class DataStateHandler(ocp.CheckpointHandler):
    """Saves every process's iterator state (bytes from ``get_state()``) to its own file."""

    def save(self, directory: epath.Path, args: "DataStateSave"):
        self._path(directory).write_text(base64.b64encode(args.iterator.get_state()).decode())

    def restore(self, directory: epath.Path, args: "DataStateRestore"):
        path = self._path(directory)
        if not path.exists():
            raise FileNotFoundError(f"no data-iterator state {path.name} in {directory} (a checkpoint "
                                    f"written by a run with a different number of processes?)")
        args.iterator.set_state(base64.b64decode(path.read_text()))
        return args.iterator

    def metadata(self, directory: epath.Path):
        return None

    def structure(self, directory: epath.Path):
        return None

    def finalize(self, directory: epath.Path):
        pass

    def close(self):
        pass

    @staticmethod
    def _path(directory: epath.Path) -> epath.Path:
        return epath.Path(directory) / f"process_{jax.process_index()}-of-{jax.process_count()}.b64"


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    iterator: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    iterator: Any


class Checkpointer:
    """Saves the steps it is given, keeps the last ``keep``, restores the newest readable one."""

    def __init__(self, directory: str | epath.Path, *, keep: int):
        if keep < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
        self.directory = epath.Path(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep),
            item_names=("params", "train_state", "data"),
        )

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, params, train_state, data_iterator) -> None:
        """Starts an asynchronous save of ``step`` (the arrays are copied before this returns)."""
        self._manager.save(step, force=True, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            train_state=ocp.args.StandardSave(train_state),
            data=DataStateSave(data_iterator),
        ))

    def restore(self, abstract_params, abstract_train_state, data_iterator):
        """``(step, params, train_state)`` from the newest readable checkpoint, or None if there is none.

        ``abstract_*`` are pytrees of ``jax.ShapeDtypeStruct`` with shardings; ``data_iterator`` is
        set to the saved state in place.
        """
        for step in reversed(self.all_steps()):
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(abstract_params),
                    train_state=ocp.args.StandardRestore(abstract_train_state),
                    data=DataStateRestore(data_iterator),
                ))
            except Exception as error:  # any unreadable piece makes the whole step unusable
                self._set_aside(step, error)
                continue
            return step, restored["params"], restored["train_state"]
        return None

    def _set_aside(self, step: int, error: Exception) -> None:
        older = [s for s in self.all_steps() if s < step]
        target = self.directory / f"{step}.corrupt"
        logging.warning(
            "checkpoint step %d in %s cannot be restored (%s: %s); moving it to %s and %s", step,
            self.directory, type(error).__name__, str(error).splitlines()[0] if str(error) else "",
            target, f"falling back to step {older[-1]}" if older else "starting from scratch")
        if jax.process_index() == 0:
            (self.directory / str(step)).rename(target)
        _sync(f"moejax_set_aside_{step}")
        self._manager.reload()

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def restore_params(directory: str | epath.Path, abstract_params):
    """The parameters of the newest checkpoint in ``directory`` (for fine-tuning from a run)."""
    directory = epath.Path(directory)
    if not directory.exists():
        raise ValueError(f"init_from: checkpoint directory {directory} does not exist")
    manager = ocp.CheckpointManager(directory, item_names=("params", "train_state", "data"),
                                    options=ocp.CheckpointManagerOptions(create=False))
    step = manager.latest_step()
    if step is None:
        raise ValueError(f"init_from: no checkpoint in {directory}")
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params)))
    except Exception as error:
        raise ValueError(f"init_from: cannot restore the parameters of step {step} in {directory} "
                         f"into this model ({type(error).__name__}: {error}); the model "
                         "configuration must match the one that wrote the checkpoint") from error
    finally:
        manager.close()
    return step, restored["params"]


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
