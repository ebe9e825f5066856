"""A local stand-in for Google Cloud Storage, so ``gs://bucket/...`` paths work in tests with no network.

Two views of one directory tree, ``<root_dir>/<bucket>/<object name>``:

* ``FakeGCSServer(root_dir)`` serves, on 127.0.0.1, the part of the GCS JSON API that TensorStore's
  ``gcs`` kvstore driver uses (media upload, media download with byte ranges, object metadata, listing,
  delete, generation preconditions) and points TensorStore at itself through the environment;
* ``FakeGCSFileSystem``, registered by ``install(root_dir)``, is the fsspec filesystem for ``gs://`` and
  ``gcs://`` that ``etils.epath`` goes through when TensorFlow is absent; orbax writes its metadata,
  commit files and custom items through epath, and its arrays through TensorStore.

An object's generation is its file's modification time in nanoseconds. Every write through either view
stamps a fresh, strictly increasing one, so TensorStore's conditional reads and writes see what GCS
would show them. ::

    with FakeGCSServer(root) as server, install(root):
        ...  # gs://bucket/... works for tensorstore, orbax and epath in this process
    # A child process gets the same view from the server's environment and this file as its launcher:
    subprocess.run([sys.executable, "tests/fake_gcs.py", root, "-m", "moejax.main", ...],
                   env={**os.environ, **server.env})

Known differences from GCS: a directory made with ``mkdir`` exists (and lists) while empty, and a
prefix stays visible after its last object is deleted over HTTP; an object and a "directory" cannot
share a name; responses carry no crc32c/md5 hashes.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import importlib
import json
import os
import posixpath
import runpy
import socket
import stat
import sys
import tempfile
import threading
import time
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import fsspec
from fsspec.implementations.local import LocalFileOpener, LocalFileSystem
from fsspec.utils import stringify_path

_generation_lock = threading.Lock()
_last_generation = 0


def _stamp_new_generation(local_path: str) -> None:
    """Gives the file at ``local_path`` a generation (mtime in ns) later than any handed out before."""
    global _last_generation
    with _generation_lock:
        _last_generation = max(time.time_ns(), _last_generation + 1)
        generation = _last_generation
    os.utime(local_path, ns=(generation, generation))


def _rfc3339(ns: int) -> str:
    moment = datetime.datetime.fromtimestamp(ns / 1e9, tz=datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ---------------------------------------------------------------------------------------------------
# HTTP server: the GCS JSON API subset TensorStore uses
# ---------------------------------------------------------------------------------------------------


class _BadRequest(Exception):
    pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: TensorStore's curl reuses connections
    server: _Server

    def log_message(self, format, *args):  # the request log is kept in ``server.requests`` instead
        pass

    def do_GET(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def do_DELETE(self):
        self._dispatch()

    def _dispatch(self):
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        # Split before unquoting: an object name travels as one segment with its slashes as %2F.
        parts = url.path.split("/")[1:]
        objects = parts[:3] == ["storage", "v1", "b"] and len(parts) >= 5 and parts[4] == "o"
        name = urllib.parse.unquote("/".join(parts[5:])) if objects else ""
        upload = parts[:4] == ["upload", "storage", "v1", "b"] and parts[5:] == ["o"]
        body = b""
        if self.command == "POST":  # read even if refused, or the connection could not be reused
            length = self.headers.get("Content-Length")
            if length is None:
                self.close_connection = True
                self._error(HTTPStatus.LENGTH_REQUIRED, "uploads need a Content-Length")
                return
            body = self.rfile.read(int(length))
        try:
            if self.command == "POST" and upload:
                self._upload(parts[4], query, body)
            elif objects and self.command == "GET" and not name:
                self._list(parts[3], query)
            elif objects and self.command == "GET" and query.get("alt") == "media":
                self._download(parts[3], name, query)
            elif objects and self.command == "GET":
                self._metadata(parts[3], name, query)
            elif objects and self.command == "DELETE" and name:
                self._delete(parts[3], name, query)
            else:
                self._error(HTTPStatus.NOT_FOUND, f"{self.command} {url.path} is not in the fake GCS API")
        except (_BadRequest, ValueError) as error:  # ValueError: a malformed number in the query
            self._error(HTTPStatus.BAD_REQUEST, str(error))

    # --- the endpoints ---

    def _upload(self, bucket: str, query: dict[str, str], body: bytes):
        if query.get("uploadType") != "media":
            raise _BadRequest(f"only uploadType=media is served, got {query.get('uploadType')!r}")
        name = query.get("name", "")
        path = self.server.object_path(bucket, name)
        with self.server.lock:
            failed = _failed_write_precondition(_generation_of(path), query)
            if failed:
                self._error(failed, f"precondition failed for gs://{bucket}/{name}")
                return
            descriptor, temporary = tempfile.mkstemp(dir=self.server.root_dir, prefix=".upload-")
            with os.fdopen(descriptor, "wb") as f:
                f.write(body)
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                os.replace(temporary, path)
            except OSError as error:  # an object name that is a "directory" here, or the reverse
                os.remove(temporary)
                self._error(HTTPStatus.CONFLICT, f"cannot store gs://{bucket}/{name}: {error}")
                return
            _stamp_new_generation(path)
            resource = self.server.resource(bucket, name, os.stat(path))
        self._send_json(HTTPStatus.OK, resource)

    def _download(self, bucket: str, name: str, query: dict[str, str]):
        path = self.server.object_path(bucket, name)
        try:
            f = open(path, "rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            self._error(HTTPStatus.NOT_FOUND, f"no object gs://{bucket}/{name}")
            return
        with f:
            # One open file gives a consistent (generation, size, bytes) even if a writer replaces it.
            info = os.fstat(f.fileno())
            generation, size = info.st_mtime_ns, info.st_size
            failed = _failed_read_precondition(generation, query)
            if failed:
                self._send(failed, b"", {"x-goog-generation": str(generation)})
                return
            byte_range = _parse_range(self.headers.get("Range"), size)
            headers = {
                "Content-Type": "application/octet-stream",
                "x-goog-generation": str(generation),
                "x-goog-metageneration": "1",
                "x-goog-stored-content-length": str(size),
            }
            if byte_range is None:
                start, stop, status = 0, size, HTTPStatus.OK
            elif byte_range == "unsatisfiable":
                self._send(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, b"",
                           headers | {"Content-Range": f"bytes */{size}"})
                return
            else:
                start, stop = byte_range
                status = HTTPStatus.PARTIAL_CONTENT
                headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
            f.seek(start)
            self._send(status, f.read(stop - start), headers)

    def _metadata(self, bucket: str, name: str, query: dict[str, str]):
        path = self.server.object_path(bucket, name)
        try:
            info = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            info = None
        if info is None or not stat.S_ISREG(info.st_mode):
            self._error(HTTPStatus.NOT_FOUND, f"no object gs://{bucket}/{name}")
            return
        failed = _failed_read_precondition(info.st_mtime_ns, query)
        if failed:
            self._send(failed, b"", {})
            return
        self._send_json(HTTPStatus.OK, self.server.resource(bucket, name, info))

    def _delete(self, bucket: str, name: str, query: dict[str, str]):
        path = self.server.object_path(bucket, name)
        with self.server.lock:
            generation = _generation_of(path)
            if not generation:
                self._error(HTTPStatus.NOT_FOUND, f"no object gs://{bucket}/{name}")
                return
            failed = _failed_write_precondition(generation, query)
            if failed:
                self._error(failed, f"precondition failed for gs://{bucket}/{name}")
                return
            os.remove(path)
        self._send(HTTPStatus.NO_CONTENT, b"", {})

    def _list(self, bucket: str, query: dict[str, str]):
        prefix = query.get("prefix", "")
        start, end = query.get("startOffset", ""), query.get("endOffset")
        # The page token is the last name already sent (opaque to clients, as on GCS).
        after = base64.urlsafe_b64decode(query["pageToken"]).decode() if query.get("pageToken") else ""
        page_size = min(int(query.get("maxResults", 1000)), 1000)
        # Every bucket exists here (one is made by its first write), so a new one lists as empty.
        matches = [
            (name, info) for name, info in self.server.objects(bucket)
            if name.startswith(prefix) and name >= start and (end is None or name < end) and name > after
        ]
        page = matches[:page_size]
        body: dict = {"kind": "storage#objects"}
        if page:
            body["items"] = [self.server.resource(bucket, name, info) for name, info in page]
        if len(matches) > page_size:
            body["nextPageToken"] = base64.urlsafe_b64encode(page[-1][0].encode()).decode()
        self._send_json(HTTPStatus.OK, body)

    # --- plumbing ---

    def _error(self, status: int, message: str):
        self._send_json(status, {"error": {"code": int(status), "message": message,
                                           "errors": [{"message": message}]}})

    def _send_json(self, status: int, body: dict):
        self._send(status, json.dumps(body).encode(), {"Content-Type": "application/json; charset=UTF-8"})

    def _send(self, status: int, body: bytes, headers: dict[str, str]):
        self.server.requests.append(f"{self.command} {self.path} {int(status)}")
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if status not in (HTTPStatus.NO_CONTENT, HTTPStatus.NOT_MODIFIED):  # these two carry no body
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _generation_of(path: str) -> int:
    """The object's generation, 0 if there is no object (GCS's ``ifGenerationMatch=0`` meaning)."""
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return 0
    return info.st_mtime_ns if stat.S_ISREG(info.st_mode) else 0


def _failed_read_precondition(generation: int, query: dict[str, str]) -> int | None:
    if "ifGenerationMatch" in query and int(query["ifGenerationMatch"]) != generation:
        return HTTPStatus.PRECONDITION_FAILED
    if "ifGenerationNotMatch" in query and int(query["ifGenerationNotMatch"]) == generation:
        return HTTPStatus.NOT_MODIFIED
    return None


def _failed_write_precondition(generation: int, query: dict[str, str]) -> int | None:
    if "ifGenerationMatch" in query and int(query["ifGenerationMatch"]) != generation:
        return HTTPStatus.PRECONDITION_FAILED
    if "ifGenerationNotMatch" in query and int(query["ifGenerationNotMatch"]) == generation:
        return HTTPStatus.PRECONDITION_FAILED
    return None


def _parse_range(header: str | None, size: int):
    """``None`` for the whole object, ``(start, stop)`` for one byte range, or ``"unsatisfiable"``."""
    if header is None:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        raise _BadRequest(f"only one byte range is served, got Range: {header}")
    first, _, last = spec.strip().partition("-")
    if not first:  # "bytes=-N": the last N bytes
        start, stop = max(size - int(last), 0), size
    else:
        start = int(first)
        stop = size if not last else min(int(last) + 1, size)
    if start >= size:  # an empty object has no byte 0 either; asked from 0, it is sent whole
        return None if start == 0 else "unsatisfiable"
    return start, stop


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root_dir: str):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root_dir = root_dir
        self.lock = threading.Lock()  # makes each conditional write or delete check-and-act atomic
        self.requests: list[str] = []
        self._connections: set[socket.socket] = set()

    def process_request(self, request, client_address):
        self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self):
        """Ends kept-alive connections, whose handler threads would otherwise wait for the client."""
        for connection in list(self._connections):
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def object_path(self, bucket: str, name: str) -> str:
        if not bucket or "/" in bucket or bucket.startswith("."):
            raise _BadRequest(f"invalid bucket name {bucket!r}")
        segments = name.split("/")
        if not name or any(segment in ("", ".", "..") for segment in segments):
            raise _BadRequest(f"object name {name!r} cannot be stored as a file (empty segment, . or ..)")
        return os.path.join(self.root_dir, bucket, *segments)

    def objects(self, bucket: str):
        """``(name, stat)`` of every object in ``bucket``, sorted by name as GCS lists them."""
        bucket_dir = os.path.join(self.root_dir, bucket)
        found = []
        for directory, _, files in os.walk(bucket_dir):
            for file in files:
                path = os.path.join(directory, file)
                with contextlib.suppress(FileNotFoundError):
                    found.append((os.path.relpath(path, bucket_dir).replace(os.sep, "/"), os.stat(path)))
        return sorted(found, key=lambda entry: entry[0])

    @staticmethod
    def resource(bucket: str, name: str, info: os.stat_result) -> dict:
        generation = info.st_mtime_ns
        return {
            "kind": "storage#object",
            "id": f"{bucket}/{name}/{generation}",
            "name": name,
            "bucket": bucket,
            "generation": str(generation),
            "metageneration": "1",
            "contentType": "application/octet-stream",
            "size": str(info.st_size),
            "timeCreated": _rfc3339(generation),
            "updated": _rfc3339(generation),
        }


class FakeGCSServer:
    """Context manager: a GCS JSON API server over ``root_dir``, and TensorStore pointed at it.

    ``env`` holds the environment variables that send TensorStore's ``gcs`` driver here (also for a
    child process); they are set in ``os.environ`` while the context is open and restored after.
    ``requests`` logs ``"METHOD path status"`` of every answered request.
    """

    def __init__(self, root_dir: str | os.PathLike):
        self.root_dir = os.path.abspath(os.fspath(root_dir))
        self.env: dict[str, str] = {}
        self.url = ""
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._saved_env: dict[str, str | None] = {}

    @property
    def requests(self) -> list[str]:
        return self._server.requests if self._server is not None else []

    def __enter__(self) -> FakeGCSServer:
        os.makedirs(self.root_dir, exist_ok=True)
        self._server = _Server(self.root_dir)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self.env = {
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            "TENSORSTORE_GCS_HTTP_VERSION": "1.1",
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake-token",
        }
        self._saved_env = {key: os.environ.get(key) for key in self.env}
        os.environ.update(self.env)
        return self

    def __exit__(self, *exc_info):
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._server.shutdown()
        self._server.close_connections()
        self._server.server_close()
        self._thread.join()


# ---------------------------------------------------------------------------------------------------
# fsspec filesystem: what etils.epath (and through it orbax) sees at gs://
# ---------------------------------------------------------------------------------------------------


class _ObjectWriter(LocalFileOpener):
    """A new object version: written aside, it replaces the object only when closed, as on GCS."""

    def close(self):
        if self.f.closed:
            return
        self.f.close()
        self.commit()
        _stamp_new_generation(self.path)

    def __exit__(self, exc_type, exc_value, traceback):
        if exc_type is not None and not self.f.closed:  # an interrupted upload leaves no object
            self.f.close()
            self.discard()
            return
        self.close()


class FakeGCSFileSystem(LocalFileSystem):
    """``gs://bucket/key`` (and ``gcs://``) as the file ``<root_dir>/bucket/key``.

    Names come back as gcsfs gives them, ``bucket/key`` without the protocol (etils relies on that).
    Methods of ``LocalFileSystem`` run on the local path; ``_strip_protocol`` leaves a local path under
    the root unchanged because those methods pass their paths through it again. Covers what
    ``etils.epath`` and orbax call: open, info/exists/isdir/ls/glob/walk, mkdir/makedirs, rm, mv, cp,
    touch.
    """

    protocol = ("gs", "gcs")
    root_marker = ""
    cachable = False
    root_dir: str | None = None  # set by ``install``

    def __init__(self, *args, **kwargs):
        # etils passes ``finalize_on_close=True`` (a gcsfs option); here an object is always final once
        # its writer closes. auto_mkdir: writing an object never needs its "parent directories" first.
        super().__init__(*args, auto_mkdir=True, **kwargs)

    @classmethod
    def _root(cls) -> str:
        if cls.root_dir is None:
            raise RuntimeError("FakeGCSFileSystem is not installed: call fake_gcs.install(root_dir)")
        return cls.root_dir

    @classmethod
    def _strip_protocol(cls, path) -> str:
        path = stringify_path(path)
        for prefix in ("gs://", "gcs://"):
            if path.startswith(prefix):
                path = path[len(prefix):]
                break
        root = cls._root()
        if path == root or path.startswith(root + "/"):
            return path.rstrip("/") or "/"
        return path.strip("/")

    @classmethod
    def _parent(cls, path) -> str:
        return posixpath.dirname(cls._strip_protocol(path))

    def _local(self, path) -> str:
        path = self._strip_protocol(path)
        return path if path.startswith("/") else posixpath.join(self._root(), path)

    def _name(self, path) -> str:
        path = self._strip_protocol(path)
        if not path.startswith("/"):
            return path
        return "" if path == self._root() else posixpath.relpath(path, self._root())

    def info(self, path, **kwargs):
        info = super().info(path if isinstance(path, os.DirEntry) else self._local(path), **kwargs)
        info["name"] = self._name(info["name"])
        return info

    def ls(self, path, detail=False, **kwargs):
        entries = super().ls(self._local(path), detail=detail, **kwargs)
        return entries if detail else [self._name(entry) for entry in entries]

    def isdir(self, path):
        return super().isdir(self._local(path))

    def isfile(self, path):
        return super().isfile(self._local(path))

    def islink(self, path):
        return super().islink(self._local(path))

    def lexists(self, path, **kwargs):
        return super().lexists(self._local(path), **kwargs)

    def mkdir(self, path, create_parents=True, **kwargs):
        # GCS has no directories, so a missing parent never makes mkdir fail.
        super().mkdir(self._local(path), create_parents=True, **kwargs)

    def makedirs(self, path, exist_ok=False):
        super().makedirs(self._local(path), exist_ok=exist_ok)

    def rmdir(self, path):
        super().rmdir(self._local(path))

    def rm_file(self, path):
        super().rm_file(self._local(path))

    def rm(self, path, recursive=False, maxdepth=None):
        paths = path if isinstance(path, list) else [path]
        super().rm([self._local(p) for p in paths], recursive=recursive, maxdepth=maxdepth)

    def cp_file(self, path1, path2, **kwargs):
        super().cp_file(self._local(path1), self._local(path2), **kwargs)
        if self.isfile(path2):
            _stamp_new_generation(self._local(path2))

    def mv(self, path1, path2, recursive=True, **kwargs):
        # On GCS a move is copy + delete: every moved object is a new generation.
        destination = self._local(path2)
        super().mv(self._local(path1), destination, recursive=recursive, **kwargs)
        if os.path.isdir(destination):
            for directory, _, files in os.walk(destination):
                for file in files:
                    _stamp_new_generation(os.path.join(directory, file))
        else:
            _stamp_new_generation(destination)

    def touch(self, path, truncate=True, **kwargs):
        super().touch(self._local(path), truncate=truncate, **kwargs)
        _stamp_new_generation(self._local(path))

    def _open(self, path, mode="rb", block_size=None, **kwargs):
        local = self._local(path)
        if "a" in mode or "+" in mode:
            raise NotImplementedError(f"GCS objects cannot be appended to or updated (mode={mode!r})")
        if "r" in mode:
            return super()._open(local, mode=mode, block_size=block_size, **kwargs)
        os.makedirs(posixpath.dirname(local), exist_ok=True)
        return _ObjectWriter(local, mode, fs=self, autocommit=False)


_GCS_PROTOCOLS = ("gs", "gcs")


@contextlib.contextmanager
def install(root_dir: str | os.PathLike):
    """Registers ``FakeGCSFileSystem`` over ``root_dir`` for ``gs://`` / ``gcs://`` while open.

    Also answers orbax's hierarchical-namespace probe with "flat bucket": orbax asks it through
    ``google-cloud-storage`` (a client of the real service, not installed here) when it lists steps
    and deletes checkpoints on gs://.
    """
    from etils.epath import backend
    from orbax.checkpoint._src.path import gcs_utils

    previous = {protocol: fsspec.registry.get(protocol) for protocol in _GCS_PROTOCOLS}
    previous_root = FakeGCSFileSystem.root_dir
    previous_probe = gcs_utils.is_hierarchical_namespace_enabled
    FakeGCSFileSystem.root_dir = os.path.abspath(os.fspath(root_dir))
    os.makedirs(FakeGCSFileSystem.root_dir, exist_ok=True)
    for protocol in _GCS_PROTOCOLS:
        fsspec.register_implementation(protocol, FakeGCSFileSystem, clobber=True)
    gcs_utils.is_hierarchical_namespace_enabled = lambda path: False
    # etils keeps one filesystem instance per protocol; drop it so the next call sees this one.
    backend.fsspec_backend._get_filesystem.cache_clear()
    try:
        yield FakeGCSFileSystem()
    finally:
        for protocol, cls in previous.items():
            if cls is None:
                # fsspec has no public way to unregister
                importlib.import_module("fsspec.registry")._registry.pop(protocol, None)
            else:
                fsspec.register_implementation(protocol, cls, clobber=True)
        gcs_utils.is_hierarchical_namespace_enabled = previous_probe
        FakeGCSFileSystem.root_dir = previous_root
        backend.fsspec_backend._get_filesystem.cache_clear()


def _main(argv: list[str]) -> None:
    """``fake_gcs.py ROOT_DIR (-m MODULE | -c CODE) [ARGS...]``: run Python with gs:// under ROOT_DIR.

    TensorStore in the child reaches the parent's server through ``FakeGCSServer.env``.
    """
    if len(argv) < 3 or argv[1] not in ("-m", "-c"):
        raise SystemExit(f"usage: {os.path.basename(__file__)} ROOT_DIR (-m MODULE | -c CODE) [ARGS...]")
    root_dir, kind, target, args = argv[0], argv[1], argv[2], argv[3:]
    with install(root_dir):
        if kind == "-m":
            sys.argv = [target, *args]
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            sys.argv = ["-c", *args]
            exec(compile(target, "<string>", "exec"), {"__name__": "__main__"})


if __name__ == "__main__":
    _main(sys.argv[1:])
