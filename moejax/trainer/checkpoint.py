"""Checkpoints of a training run: one small wrapper around an orbax ``CheckpointManager``.

A checkpoint at step ``S`` (``S`` optimizer steps done) is the directory ``<dir>/<S>`` with four items:

* ``params`` — the model parameters (a pytree of arrays, restored directly onto their shards);
* ``train_state`` — optimizer state and the model's non-parameter state (router biases, tables);
* ``data`` — each process's data-iterator state, one file per process (``process_<i>-of-<n>.b64``),
  so a resumed run reads exactly the batches the interrupted run would have read;
* ``checksums`` — one 32-bit checksum per array of ``params`` and ``train_state`` (:func:`checksums`),
  computed on the device at save time.

Restoring tries the newest step first. A step whose arrays do not have the shapes and dtypes asked
for was written by a different model: restoring raises :class:`CheckpointMismatch` naming the
arrays and changes nothing. A step that is corrupt — unreadable (truncated files, missing items) or
read back with different checksums (a flipped bit) — is reported, renamed to ``<S>.corrupt`` (kept
for inspection, never deleted) and the next older step is tried, so the run loses only the work
after that older step. The data iterator is set only from the step finally restored.
"""

from __future__ import annotations

import base64
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
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


class CheckpointMismatch(ValueError):
    """A checkpoint holds arrays of other shapes or dtypes than the model asks for."""


class _StateHolder:
    """Takes a restored iterator state without touching the real iterator (applied on success)."""

    state = None

    def set_state(self, state):
        self.state = state


def checksums(tree) -> dict[str, int]:
    """``{key path: 32-bit checksum}`` of every array of ``tree``, computed where the arrays live.

    The checksum of an array is the sum of its elements' bit patterns (as unsigned ints) times the
    odd weights ``2 i + 1`` (``i`` = flat index), modulo 2**32: any single flipped bit changes it.
    """
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    values = jax.device_get(_checksum_leaves([leaf for _, leaf in leaves]))
    return {_key(path): int(v) for (path, _), v in zip(leaves, values)}


def _key(path) -> str:
    """``layers/0/attention/w_q``: the same for integer and string keys (orbax stores strings)."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


@jax.jit
def _checksum_leaves(leaves):
    out = []
    for x in leaves:
        if x.dtype == jnp.bool_:
            bits = x.astype(jnp.uint32)
        else:
            width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
            bits = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)
        bits = bits.reshape(-1)
        weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
        out.append(jnp.sum(bits * weights, dtype=jnp.uint32))
    return out


class Checkpointer:
    """Saves the steps it is given, keeps the last ``keep``, restores the newest readable one."""

    def __init__(self, directory: str | epath.Path, *, keep: int):
        if keep < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
        self.directory = epath.Path(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep),
            item_handlers=dict(params=ocp.StandardCheckpointHandler(),
                               train_state=ocp.StandardCheckpointHandler(),
                               data=DataStateHandler(), checksums=ocp.JsonCheckpointHandler()),
        )

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, params, train_state, data_iterator) -> None:
        """Starts an asynchronous save of ``step`` (the arrays are copied before this returns)."""
        self._manager.save(step, force=True, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            train_state=ocp.args.StandardSave(train_state),
            data=DataStateSave(data_iterator),
            checksums=ocp.args.JsonSave({"params": checksums(params),
                                         "train_state": checksums(train_state)}),
        ))

    def restore(self, abstract_params, abstract_train_state, data_iterator):
        """``(step, params, train_state)`` from the newest readable checkpoint, or None if there is none.

        ``abstract_*`` are pytrees of ``jax.ShapeDtypeStruct`` with shardings; ``data_iterator`` is
        set to the restored step's state in place (and left alone when no step is restored).
        """
        for step in reversed(self.all_steps()):
            self._check_shapes(step, "params", abstract_params)
            self._check_shapes(step, "train_state", abstract_train_state)
            holder = _StateHolder()
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(abstract_params),
                    train_state=ocp.args.StandardRestore(abstract_train_state),
                    data=DataStateRestore(holder),
                ))
                self._verify(step, restored)
            except Exception as error:  # any unreadable piece makes the whole step unusable
                self._set_aside(step, error)
                continue
            data_iterator.set_state(holder.state)
            return step, restored["params"], restored["train_state"]
        return None

    def _check_shapes(self, step: int, item: str, abstract) -> None:
        """Raises :class:`CheckpointMismatch` if ``item`` of ``step`` is readable but its arrays
        differ from ``abstract`` (an unreadable one is left to the restore, as corrupt)."""
        try:
            stored = self._manager.item_metadata(step)[item]
            saved = {_key(p): (tuple(m.shape), jnp.dtype(m.dtype))
                     for p, m in jax.tree_util.tree_leaves_with_path(stored)}
        except Exception:  # noqa: BLE001 - unreadable metadata: corruption, handled by restore
            return
        wanted = {_key(p): (tuple(a.shape), jnp.dtype(a.dtype))
                  for p, a in jax.tree_util.tree_leaves_with_path(abstract)}
        if saved == wanted:
            return
        show = lambda v: "absent" if v is None else f"{v[0]} {v[1].name}"  # noqa: E731
        lines = [f"{key}: saved {show(saved.get(key))}, model {show(wanted.get(key))}"
                 for key in sorted(saved.keys() | wanted.keys()) if saved.get(key) != wanted.get(key)]
        more = f" (and {len(lines) - 8} more)" if len(lines) > 8 else ""
        raise CheckpointMismatch(
            f"checkpoint {self.directory}/{step} was written by a different model: {item} "
            f"{'; '.join(lines[:8])}{more}. Train it in a new --workdir (the checkpoints were "
            "left as they are)")

    def _verify(self, step: int, restored) -> None:
        try:
            stored = self._manager.restore(step, args=ocp.args.Composite(
                checksums=ocp.args.JsonRestore()))["checksums"]
        except Exception:  # noqa: BLE001 - written before checksums existed: nothing to compare
            return
        for item in ("params", "train_state"):
            got = checksums(restored[item])
            bad = sorted(k for k in stored[item] if got.get(k) != stored[item][k])
            if bad or got.keys() != stored[item].keys():
                raise ValueError(f"checksum mismatch in {item}: {', '.join(bad) or 'keys differ'}")

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
    manager = ocp.CheckpointManager(directory, item_handlers=dict(
        params=ocp.StandardCheckpointHandler()), options=ocp.CheckpointManagerOptions(create=False))
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
