"""The run's directory: one trainer at a time (a lock file), writable before anything starts, and
the config it was started with (``config.json``), which a resumed run must match.

Also the process-level pieces of a run: ``jax.distributed`` start-up and SIGTERM handling.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket

import jax
import numpy as np
from absl import logging
from etils import epath

from moejax.trainer.config import default_config, model_fields, moe_fields

LOCK_FILE = "trainer.lock"
CONFIG_FILE = "config.json"

# Keys a resumed run may change freely: how long to train and what to log, evaluate and keep.
FREE_KEYS = ("num_train_steps", "log_every_steps", "eval_every_steps", "eval_batches",
             "checkpoint_every_steps", "keep_checkpoints", "progress_bar", "distributed",
             "skip_nonfinite_steps", "allow_new_config", "init_from", "upcycle", "upcycle_noise",
             "data_dir", "instruct_eval")
# Keys that fix the arrays of a run or the data it reads: a change is never resumed.
SHAPE_KEYS = ("model", "moe", "seq_len", "batch_size", "tokenizer", "vocab_size", "dataset",
              "train_split", "text_key", "seed", "freeze", "stream_data")
# Everything else (optimizer values, eval_split, mesh, ...) changes with allow_new_config=True.


def check_writable(workdir: epath.Path) -> None:
    """Fails at once (not at the first save) when the workdir or its checkpoints cannot be written."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        for directory in (workdir, workdir / "checkpoints"):
            if directory.exists():
                probe = directory / f".write_probe_{jax.process_index()}"
                probe.write_text("ok")
                probe.unlink()
    except OSError as error:
        raise ValueError(f"workdir {workdir} is not writable ({error.strerror or error})") from error


@contextlib.contextmanager
def lock(workdir: epath.Path, *, enabled: bool = True):
    """Holds ``<workdir>/trainer.lock`` (pid and host of the holder) for the duration of the run.

    A lock left by a process of this host that no longer runs (a killed trainer) is taken over; a
    live holder, or one on another host, makes this run fail naming it.
    """
    if not enabled:
        yield
        return
    path = workdir / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    if path.exists():
        try:
            holder = json.loads(path.read_text())
        except (OSError, ValueError):
            holder = {}
        if _alive(holder):
            raise ValueError(
                f"workdir {workdir} is in use by another trainer (pid {holder.get('pid')} on "
                f"{holder.get('host')}, lock file {path}); wait for it to finish, or delete the "
                "lock file if that trainer is gone")
        logging.warning("taking over the stale lock %s of pid %s on %s", path, holder.get("pid"),
                        holder.get("host"))
        path.unlink()
    _create_exclusive(path, json.dumps(me))
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


def _create_exclusive(path: epath.Path, content: str) -> None:
    if not os.fspath(path).startswith(("gs://", "s3://")):  # a local file: atomic
        try:
            fd = os.open(os.fspath(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError as error:
            raise ValueError(f"workdir {path.parent} is in use by another trainer (lock file "
                             f"{path} appeared while this one started)") from error
        with os.fdopen(fd, "w") as f:
            f.write(content)
    else:  # object storage has no exclusive create: last writer wins, checked once
        path.write_text(content)


def _alive(holder: dict) -> bool:
    """True unless ``holder`` is a process of this host that has ended (or the file was garbage)."""
    if not isinstance(holder, dict) or "pid" not in holder:
        return False
    if holder.get("host") != socket.gethostname():
        return True  # cannot be checked from here
    if holder["pid"] == os.getpid():
        return False  # this process (an earlier run in it ended without cleaning up)
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def flat_config(config: dict, prefix: str = "") -> dict[str, object]:
    """``{"optimizer.learning_rate": 0.003, ...}`` with ``model`` / ``moe`` filled with defaults."""
    out = {}
    for key, value in config.items():
        if key == "model" and value is not None:
            value = model_fields(**value)
        elif key == "moe" and value is not None:
            value = moe_fields(**value)
        if isinstance(value, dict):
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.loads(json.dumps(value, default=str))
    return out


def check_config_unchanged(workdir: epath.Path, config, *, resuming: bool) -> None:
    """A resumed run's config against the one its workdir was started with (``config.json``).

    Raises a ValueError listing the changed keys (and touches nothing) when a change would alter an
    array's shape or the data, or any change beyond :data:`FREE_KEYS` without
    ``allow_new_config``. A key the saved config lacks (one added to the schema since) counts as its
    default.
    """
    path = workdir / CONFIG_FILE
    if not resuming or not path.exists():
        return
    old = flat_config({**default_config().to_dict(), **json.loads(path.read_text())})
    new = flat_config(config.to_dict())
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k, "<unset>") != new.get(k, "<unset>"))
    top = lambda key: key.split(".", 1)[0]  # noqa: E731
    refused = [k for k in changed if top(k) in SHAPE_KEYS
               or (top(k) not in FREE_KEYS and not config.allow_new_config)]
    if refused:
        diff = "; ".join(f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}"
                         for k in refused)
        shape = any(top(k) in SHAPE_KEYS for k in refused)
        advice = ("these keys fix the model's arrays or its data: train in a new --workdir"
                  if shape else "pass --config.allow_new_config=True to resume with them")
        raise ValueError(f"workdir {workdir} holds a run started with a different config "
                         f"({path}): {diff}; {advice}. Nothing in the workdir was changed.")


def save_config(workdir: epath.Path, config) -> None:
    (workdir / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=1, default=str) + "\n")


def maybe_initialize_distributed(config) -> None:
    """``jax.distributed.initialize`` when a multi-process job is configured or detected.

    Explicit: ``config.distributed`` (coordinator_address, num_processes, process_id) or the
    ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` variables. Detected:
    multi-host TPU slices and SLURM / Open MPI jobs of more than one task (JAX reads their settings).
    On CPU the collectives go through gloo.
    """
    if jax.distributed.is_initialized():
        return
    explicit = dict(config.distributed or {})
    address = explicit.get("coordinator_address") or os.environ.get("JAX_COORDINATOR_ADDRESS")
    detected = (
        "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
        or int(os.environ.get("SLURM_NTASKS", "1")) > 1
        or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    )
    if not address and not detected:
        return
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if address:
        num_processes = explicit.get("num_processes") or int(os.environ["JAX_NUM_PROCESSES"])
        process_id = explicit.get("process_id")
        if process_id is None:
            process_id = int(os.environ["JAX_PROCESS_ID"])
        jax.distributed.initialize(address, num_processes=num_processes, process_id=process_id)
    else:
        jax.distributed.initialize()


class StopSignal:
    """SIGTERM -> stop at the next step boundary (all processes agree on the step)."""

    def __init__(self):
        self._received = False
        self._previous = None

    def __enter__(self):
        def handler(signum, frame):
            del signum, frame
            self._received = True

        self._previous = signal.signal(signal.SIGTERM, handler)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self._previous)

    def requested(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self._received
        from jax.experimental import multihost_utils

        flag = np.asarray([self._received], np.int32)
        return bool(multihost_utils.process_allgather(flag).max()) if step % 10 == 0 else False
