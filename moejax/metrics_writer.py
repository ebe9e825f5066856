"""Training metrics to two places: ``<workdir>/metrics.jsonl`` (one JSON object per row) and TensorBoard.

Rows are ``{"step": S, "train_loss": ..., ...}`` for training and ``{"step": S, "eval_loss": ...}`` for
evaluation. A value that is a list of numbers (one per MoE layer) becomes TensorBoard scalars
``<name>/moe_layer_<i>``; nested lists (expert load per layer) go only to the JSON file.

A run resumed from step ``S`` first drops the rows after ``S`` (they came from work that is being
redone) from ``metrics.jsonl`` and tells TensorBoard to purge its events after ``S``, so both read
like one uninterrupted run. Only process 0 writes; other processes get a writer that does nothing.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping

from tensorboardX import SummaryWriter

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def read_metrics(workdir: str) -> list[dict]:
    """All rows of ``<workdir>/metrics.jsonl`` (empty if there is none)."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsWriter:
    """Appends rows to ``metrics.jsonl`` and TensorBoard; ``resume_step`` = the step a run restarts at."""

    def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int = 0):
        self.enabled = enabled
        self.path = os.path.join(workdir, METRICS_FILE)
        self.tensorboard_dir = os.path.join(workdir, TENSORBOARD_DIR)
        if not enabled:
            return
        rows = [row for row in read_metrics(workdir) if row["step"] <= resume_step]
        with open(self.path, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        self._tensorboard = SummaryWriter(self.tensorboard_dir, purge_step=resume_step + 1,
                                          flush_secs=30)

    def write(self, step: int, values: Mapping[str, float | list]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{name: _jsonable(value) for name, value in values.items()}}
        with open(self.path, "a") as f:
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

    def close(self) -> None:
        if self.enabled:
            self._tensorboard.close()


def _jsonable(value):
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value
