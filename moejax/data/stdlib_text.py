"""``stdlib_text``: the running Python's standard-library ``.py`` files as a TFDS text corpus.

Real text that is present on every machine, so the default experiments need no download. Each example is
one file: ``{"text": bytes, "path": str}`` with ``path`` relative to ``sysconfig.get_paths()["stdlib"]``.

- Files: every ``*.py`` below the stdlib root except ``site-packages`` / ``dist-packages``, test suites
  (``test``, ``tests``, ``idle_test`` directories) and ``__pycache__``. On CPython 3.11: 734 files, 12 MB,
  30 of them in validation (the test suites would add 19 MB of highly repetitive code).
- Split: a file is in ``validation`` when ``sha1(path) % 20 == 0`` (5 %), else in ``train``: stable across
  machines, Python versions and file additions.
- Size cap: files are taken in ``sha1(path)`` order (a uniform sample, not an alphabetical prefix) until
  ``max_bytes`` (32 MiB, above every current CPython) and ``max_files_per_split`` are reached.
- Configs: ``default`` (the whole corpus, prepared in about a second) and ``small`` (16 files per split,
  for tests and quick demos: ``stdlib_text/small``).

The prepared data is the stdlib of the Python that prepared it; it is reused as is by later runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import sysconfig

import tensorflow_datasets as tfds
from etils import epath

_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
VALIDATION_MODULUS = 20


def path_hash(relative_path: str) -> int:
    """Stable 64-bit hash of a relative path; decides the split and the order of the size cap."""
    return int.from_bytes(hashlib.sha1(relative_path.encode("utf-8")).digest()[:8], "big")


def split_of(relative_path: str) -> str:
    return "validation" if path_hash(relative_path) % VALIDATION_MODULUS == 0 else "train"


def stdlib_files(
    root: pathlib.Path, *, max_bytes: int | None = None, max_files_per_split: int | None = None
) -> dict[str, list[str]]:
    """Relative paths per split, in ``path_hash`` order, after the exclusions and caps."""
    paths = [
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if p.is_file() and not _EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1])
    ]
    if not paths:
        raise ValueError(f"no .py files found under the standard-library root {root}")
    selected: dict[str, list[str]] = {"train": [], "validation": []}
    total_bytes = 0
    for rel in sorted(paths, key=lambda r: (path_hash(r), r)):
        files = selected[split_of(rel)]
        if max_files_per_split is not None and len(files) >= max_files_per_split:
            continue
        size = (root / rel).stat().st_size
        if max_bytes is not None and total_bytes + size > max_bytes:
            continue
        files.append(rel)
        total_bytes += size
    return selected


@dataclasses.dataclass
class StdlibTextConfig(tfds.core.BuilderConfig):
    max_bytes: int | None = 32 * 2**20
    max_files_per_split: int | None = None


class StdlibText(tfds.core.GeneratorBasedBuilder):
    """The Python standard library's source files, one example per file."""

    # tfds finds a packaged builder's source through `importlib_resources`, which it does not install.
    code_path = epath.Path(__file__)

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [
        StdlibTextConfig(name="default", description="All stdlib .py files except test suites."),
        StdlibTextConfig(name="small", description="16 files per split.", max_files_per_split=16),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text(), "path": tfds.features.Text()}
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        root = pathlib.Path(sysconfig.get_paths()["stdlib"])
        config = self.builder_config
        files = stdlib_files(
            root, max_bytes=config.max_bytes, max_files_per_split=config.max_files_per_split
        )
        return {split: self._generate_examples(root, paths) for split, paths in files.items()}

    def _generate_examples(self, root: pathlib.Path, paths: list[str]):
        for rel in paths:
            yield rel, {"text": (root / rel).read_bytes(), "path": rel}
