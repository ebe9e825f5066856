"""Run directories that may be local or in object storage: ``runs/x`` or ``gs://bucket/runs/x``.

Everything the trainer writes goes through ``etils.epath`` (checkpoints through orbax, which does the
same). A local directory is made absolute; a URI (``gs://``, ``s3://``, ...) is kept as it is and read
and written through fsspec (``gs://`` needs ``gcsfs``, and orbax asks ``google-cloud-storage`` about
the bucket: ``pip install 'moejax[gcs]'``, included in the ``tpu`` extra). Object stores cannot append to a file, so files that grow during a run are written
locally first and copied up (:class:`Mirror`).
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import sys
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


def config_package_on_path(argv) -> None:
    """Config files import their package (``experiments.common``, ``experiments.pod.slices``): put
    the directory above the outermost package holding ``--config`` on ``sys.path``, so that
    ``--config=experiments/<name>.py`` works from any directory."""
    for arg in argv:
        if arg.startswith("--config="):
            directory = os.path.dirname(os.path.abspath(arg.split("=", 1)[1].split(":", 1)[0]))
            if not os.path.exists(os.path.join(directory, "__init__.py")):
                continue
            while os.path.exists(os.path.join(os.path.dirname(directory), "__init__.py")):
                directory = os.path.dirname(directory)
            sys.path.insert(0, os.path.dirname(directory))


def error_line(error: BaseException) -> str:
    """One line for an error: the message's first line, or the last line of a traceback it
    embeds (ml_collections wraps a config file's own error in one)."""
    text = error.args[0] if (isinstance(error, KeyError) and error.args
                             and isinstance(error.args[0], str)) else str(error)
    text = text.strip()
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":  # a KeyError's quoted repr
        try:
            text = str(ast.literal_eval(text))
        except (ValueError, SyntaxError):
            pass
    lines = [line.strip().strip("'") for line in text.splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if any(line.startswith("Traceback") for line in lines):
        return f"{lines[0].rstrip(':')}: {lines[-1]}"
    return " ".join(lines)
