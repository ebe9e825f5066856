"""Run directories that may be local or in object storage: ``runs/x`` or ``gs://bucket/runs/x``.

Everything the trainer writes goes through ``etils.epath`` (checkpoints through orbax, which does the
same). A local directory is made absolute; a URI (``gs://``, ``s3://``, ...) is kept as it is and read
and written through fsspec (``gs://`` needs ``gcsfs``, and orbax asks ``google-cloud-storage`` about
the bucket: ``pip install 'moejax[gcs]'``, included in the ``tpu`` extra). Object stores cannot append to a file, so files that grow during a run are written
locally first and copied up (:class:`Mirror`).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile

from etils import epath

_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_remote(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a URI (``gs://...``) rather than a local path."""
    return bool(_URI.match(os.fspath(path)))


def resolve(path: str | os.PathLike) -> epath.Path:
    """``path`` as an ``epath.Path``: local paths made absolute, URIs unchanged."""
    text = os.fspath(path)
    if not text:
        raise ValueError("workdir must not be empty")
    return epath.Path(text if is_remote(text) else os.path.abspath(text))


class Mirror:
    """A local directory standing in for ``target``; ``sync()`` copies what changed to ``target``.

    For a local ``target`` the mirror is ``target`` itself and ``sync`` does nothing. For a remote one
    it is a fresh temporary directory, first given a copy of each of ``fetch`` (names relative to
    ``target``: a file, or a directory whose files are copied) that exists, so a resumed run
    continues them. ``close()`` syncs and removes the temporary directory.
    """

    def __init__(self, target: epath.Path, fetch: tuple[str, ...] = ()):
        self.target = target
        self.remote = is_remote(target)
        self._uploaded: dict[str, tuple[int, int]] = {}
        if not self.remote:
            self.local = target
            return
        self.local = epath.Path(tempfile.mkdtemp(prefix="moejax-mirror-"))
        for name in fetch:
            source = target / name
            if source.is_dir():
                files = [item for item in source.iterdir() if item.is_file()]
            elif source.exists():
                files = [source]
            else:
                continue
            for item in files:
                destination = self.local / _key(item, target)
                destination.parent.mkdir(parents=True, exist_ok=True)
                destination.write_bytes(item.read_bytes())
                self._uploaded[_key(destination, self.local)] = _signature(destination)

    def sync(self) -> None:
        """Copies every local file that is new or changed since the last sync to ``target``."""
        if not self.remote:
            return
        for root, _, files in os.walk(self.local):
            for name in files:
                path = epath.Path(root) / name
                key, signature = _key(path, self.local), _signature(path)
                if self._uploaded.get(key) == signature:
                    continue
                destination = self.target / key
                destination.parent.mkdir(parents=True, exist_ok=True)
                destination.write_bytes(path.read_bytes())
                self._uploaded[key] = signature

    def close(self) -> None:
        if self.remote:
            self.sync()
            shutil.rmtree(self.local, ignore_errors=True)


def _key(path: epath.Path, root: epath.Path) -> str:
    """``path`` relative to ``root`` (string prefixes: ``os.path.relpath`` would mangle a URI)."""
    text, prefix = os.fspath(path), os.fspath(root).rstrip("/") + "/"
    if not text.startswith(prefix):
        raise ValueError(f"{text} is not inside {prefix}")
    return text[len(prefix):]


def _signature(path: epath.Path) -> tuple[int, int]:
    stat = os.stat(os.fspath(path))
    return stat.st_size, stat.st_mtime_ns
