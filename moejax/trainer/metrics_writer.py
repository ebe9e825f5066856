"""Training metrics to two places: ``<workdir>/metrics.jsonl`` (one JSON object per row) and TensorBoard.

Rows are ``{"step": S, "train_loss": ..., ...}`` for training and ``{"step": S, "eval_loss": ...}`` for
evaluation. A value that is a list of numbers (one per MoE layer) becomes TensorBoard scalars
``<name>/moe_layer_<i>``; nested lists (expert load per layer) go only to the JSON file.

A run resumed from step ``S`` first drops the rows after ``S`` (they came from work that is being
redone) from ``metrics.jsonl`` and tells TensorBoard to purge its events after ``S``, so both read
like one uninterrupted run. Only process 0 writes; other processes get a writer that does nothing.

A remote workdir (``gs://...``) gets both through a local :class:`moejax.paths.Mirror`: rows and events
are written locally and copied up by ``flush()`` (the trainer calls it after every evaluation and
checkpoint) and ``close()``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping

from absl import logging
from tensorboardX import SummaryWriter

from moejax import paths

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    """All rows of ``<workdir>/metrics.jsonl`` (empty if there is none); ``workdir`` may be a URI.

    A last line cut short (the writer killed mid-row) is dropped with a warning; any other line
    that is not JSON is an error naming the file and line.
    """
    path = paths.resolve(workdir) / METRICS_FILE
    if not path.exists():
        return []
    lines = [(number, line) for number, line in enumerate(path.read_text().splitlines(), 1)
             if line.strip()]
    rows = []
    for i, (number, line) in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            if i == len(lines) - 1:
                logging.warning("%s: dropping its last line %d, cut short (%s)", path, number, error)
                break
            raise ValueError(f"{path}, line {number}: not a JSON row ({error})") from error
    return rows


class MetricsWriter:
    """Appends rows to ``metrics.jsonl`` and TensorBoard; ``resume_step`` = the step a run restarts at."""

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True, resume_step: int = 0):
        self.enabled = enabled
        workdir = paths.resolve(workdir)
        self.path = workdir / METRICS_FILE
        self.tensorboard_dir = workdir / TENSORBOARD_DIR
        if not enabled:
            return
        self._mirror = paths.Mirror(workdir, fetch=(METRICS_FILE, TENSORBOARD_DIR))
        self._local_path = os.fspath(self._mirror.local / METRICS_FILE)
        rows = [row for row in read_metrics(self._mirror.local) if row["step"] <= resume_step]
        with open(self._local_path, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        self._tensorboard = SummaryWriter(os.fspath(self._mirror.local / TENSORBOARD_DIR),
                                          purge_step=resume_step + 1, flush_secs=30)

    def write(self, step: int, values: Mapping[str, float | list]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{name: _jsonable(value) for name, value in values.items()}}
        with open(self._local_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for name, value in row.items():
            if name == "step":
                continue
            if isinstance(value, list):
                if value and not isinstance(value[0], list):
                    for i, v in enumerate(value):
                        self._tensorboard.add_scalar(f"{name}/moe_layer_{i}", v, step)
            elif value is not None:
                self._tensorboard.add_scalar(name, value, step)

    def flush(self) -> None:
        if self.enabled:
            self._tensorboard.flush()
            self._mirror.sync()

    def close(self) -> None:
        if self.enabled:
            self._tensorboard.close()
            self._mirror.close()


def _jsonable(value):
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value
