"""Collectives in compiled HLO text: what a step sends between devices, read from ``compiled.as_text()``.

:func:`collectives` lists every all-to-all, all-gather, all-reduce, reduce-scatter and
collective-permute with its result size, its replica-group size and the branch of the
outermost ``conditional`` it runs in (expert parallelism's exchange has a fast branch and one that
exchanges in rounds).
``sent_bytes`` is what one device sends under the usual ring/pairwise algorithms:
``(n-1)/n`` of the buffer for all-to-all and all-gather, twice that for all-reduce, ``(n-1)`` times
the result for reduce-scatter, the whole buffer for collective-permute.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

OPS = ("all-to-all", "all-gather", "all-reduce", "reduce-scatter", "collective-permute")

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128)\[([\d,]*)\]")
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+(" + "|".join(OPS) + r")\((.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLED = re.compile(
    r"(?:calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")


class Collective(NamedTuple):
    op: str
    name: str
    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    result_bytes: int
    group_size: int
    branch: str  # "" outside any conditional, else "<conditional name>/<branch index>"

    @property
    def sent_bytes(self) -> float:
        n = self.group_size
        if n <= 1:
            return 0.0
        if self.op in ("all-to-all", "all-gather"):
            return self.result_bytes * (n - 1) / n
        if self.op == "all-reduce":
            return 2 * self.result_bytes * (n - 1) / n
        if self.op == "reduce-scatter":
            return float(self.result_bytes * (n - 1))
        return float(self.result_bytes)


def _group_size(attrs: str, num_devices: int | None) -> int:
    if m := re.search(r"replica_groups=\{\{([\d,\s]*)\}", attrs):
        return len([t for t in m.group(1).split(",") if t.strip()])
    if m := re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attrs):
        return int(m.group(2))
    if m := re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs):
        sizes = dict(re.findall(r"'([\w]+)'=(\d+)", m.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'([\w]+)'", m.group(2)))
    if "source_target_pairs=" in attrs:
        return 2
    return num_devices or 1


def collectives(hlo_text: str, num_devices: int | None = None) -> list[Collective]:
    """Every collective in ``hlo_text`` (``jax.jit(f).lower(...).compile().as_text()``)."""
    computations: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        if (m := _COMPUTATION.match(line)) and "=" not in line.split("{")[0].split("(")[0]:
            current = m.group(1)
            computations[current] = []
        elif current is not None:
            computations[current].append(line)

    # The outermost conditional branch (if any) each computation runs in, following calls from the
    # computations nothing calls (the entry) down: a conditional inside a branch (the exchange
    # rounds of an overflowing expert-parallel step) is part of that branch.
    # Per computation: (computation it calls, the "<conditional>/<index>" label when it is a branch).
    callees: dict[str, list[tuple[str, str | None]]] = {}
    for name, lines in computations.items():
        calls = []
        for line in lines:
            calls += [(callee, None) for callee in _CALLED.findall(line)]
            if m := _BRANCHES.search(line):
                cond = line.split("=")[0].strip().lstrip("%")
                calls += [(callee, f"{cond}/{i}") for i, callee in
                          enumerate(re.findall(r"%?([\w.\-]+)", m.group(1)))]
        callees[name] = calls
    called = {callee for calls in callees.values() for callee, _ in calls}
    branch_of: dict[str, str] = {}

    def mark(name: str, label: str) -> None:
        if name in branch_of or name not in computations:
            return
        branch_of[name] = label
        for callee, branch in callees[name]:
            mark(callee, label or branch or "")

    for name in computations:
        if name not in called:
            mark(name, "")
    found = []
    for name, lines in computations.items():
        for line in lines:
            m = _INSTRUCTION.match(line)
            if not m:
                continue
            shapes = tuple((dt, tuple(int(d) for d in dims.split(",") if d))
                           for dt, dims in _ARRAY.findall(m.group(2)))
            size = sum(_DTYPE_BYTES[dt] * math.prod(dims) for dt, dims in shapes)
            found.append(Collective(m.group(3), m.group(1), shapes, size,
                                    _group_size(m.group(4), num_devices),
                                    branch_of.get(name, "")))
    return found
