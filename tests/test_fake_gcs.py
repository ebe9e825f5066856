"""The fake GCS of ``fake_gcs.py``: TensorStore (over HTTP), etils.epath (through fsspec) and orbax (both,
through moejax's ``Checkpointer``) see one bucket at ``gs://``, kept in a local directory."""

import importlib
import json
import os
import subprocess
import sys
import urllib.parse
import urllib.request

import fsspec
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts
from etils import epath
from fsspec.implementations.local import LocalFileSystem
from orbax.checkpoint._src.path import gcs_utils

import fake_gcs
from moejax import data
from moejax.trainer.checkpoint import Checkpointer

_ENV_NAMES = ("TENSORSTORE_GCS_HTTP_URL", "TENSORSTORE_GCS_HTTP_VERSION", "GOOGLE_AUTH_TOKEN_FOR_TESTING")


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """One fake GCS for the module; each test writes to its own bucket."""
    root = tmp_path_factory.mktemp("gcs")
    with fake_gcs.FakeGCSServer(root) as server, fake_gcs.install(root):
        yield server


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def _media_url(server, bucket, name):
    return f"{server.url}/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}?alt=media"


def _iterator(data_dir):
    return data.create_iterator("stdlib_text/small", data_dir=data_dir, split="train", seq_len=8,
                                batch_size=2, process_index=0, process_count=1)


def _state_at(step):
    """(params, train_state) whose every value depends on ``step``."""
    params = {"w_DxF": jnp.arange(6, dtype=jnp.float32).reshape(2, 3) * step,
              "b_F": jnp.full((3,), step, jnp.int32)}
    return params, {"count": jnp.array(step, jnp.int32)}


def _abstract(tree):
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _assert_trees_equal(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


# --- TensorStore over HTTP ---


def test_tensorstore_zarr_array_round_trips_through_the_server(gcs):
    array_4x6 = np.arange(24, dtype=np.float32).reshape(4, 6) / 4
    spec = {"driver": "zarr", "kvstore": "gs://zarr-bucket/arr/"}
    store = ts.open(spec, create=True, dtype=ts.float32, shape=[4, 6],
                    chunk_layout=ts.ChunkLayout(chunk_shape=[2, 3])).result()
    store.write(array_4x6).result()

    np.testing.assert_array_equal(ts.open(spec).result().read().result(), array_4x6)
    stored = sorted(os.listdir(os.path.join(gcs.root_dir, "zarr-bucket", "arr")))
    assert stored == [".zarray", "0.0", "0.1", "1.0", "1.1"]


def test_conditional_write_against_an_older_generation_is_refused(gcs):
    kvstore = ts.KvStore.open("gs://conditional-bucket/").result()
    first = kvstore.write("key", b"first").result()
    kvstore.write("key", b"second").result()

    refused = kvstore.write("key", b"third", if_equal=first.generation).result()

    assert refused.generation == b""  # TensorStore's "condition not met"
    assert kvstore.read("key").result().value == b"second"


def test_read_if_changed_of_an_unchanged_object_returns_no_value(gcs):
    kvstore = ts.KvStore.open("gs://conditional-bucket/").result()
    kvstore.write("unchanged", b"value").result()
    generation = kvstore.read("unchanged").result().stamp.generation

    result = kvstore.read("unchanged", if_not_equal=generation).result()

    assert (result.state, result.value) == ("unspecified", b"")


def test_epath_overwrite_is_a_new_generation_for_tensorstore(gcs):
    kvstore = ts.KvStore.open("gs://conditional-bucket/").result()
    kvstore.write("rewritten", b"old").result()
    generation = kvstore.read("rewritten").result().stamp.generation

    epath.Path("gs://conditional-bucket/rewritten").write_bytes(b"new")  # same size

    assert kvstore.read("rewritten", if_not_equal=generation).result().value == b"new"


def test_listing_pages_through_every_object_under_the_prefix(gcs):
    for name in ("p/a", "p/b/c", "p/b/d", "p/e", "q/f"):
        epath.Path(f"gs://list-bucket/{name}").write_text(name)
    listed, pages, token = [], 0, None
    while pages < 5 and (pages == 0 or token):  # bounded: a token that never ends fails, not hangs
        query = {"prefix": "p/", "maxResults": "2"} | ({"pageToken": token} if token else {})
        url = f"{gcs.url}/storage/v1/b/list-bucket/o?{urllib.parse.urlencode(query)}"
        with urllib.request.urlopen(url) as response:
            page = json.load(response)
        listed += [item["name"] for item in page.get("items", [])]
        pages, token = pages + 1, page.get("nextPageToken")

    assert listed == ["p/a", "p/b/c", "p/b/d", "p/e"]
    assert (pages, token) == (2, None)


# --- etils.epath and the server share the objects ---


def test_epath_write_is_served_over_http(gcs):
    epath.Path("gs://epath-bucket/dir/f.txt").write_text("written by epath")

    with urllib.request.urlopen(_media_url(gcs, "epath-bucket", "dir/f.txt")) as response:
        assert response.read() == b"written by epath"


def test_http_upload_is_read_by_epath(gcs):
    upload = urllib.request.Request(
        f"{gcs.url}/upload/storage/v1/b/epath-bucket/o?uploadType=media&name=dir%2Fg.txt",
        data=b"uploaded over http", method="POST")
    urllib.request.urlopen(upload).close()

    assert epath.Path("gs://epath-bucket/dir/g.txt").read_text() == "uploaded over http"
    assert "g.txt" in [path.name for path in epath.Path("gs://epath-bucket/dir").iterdir()]


# --- orbax through moejax's Checkpointer ---


def test_checkpointer_keeps_the_newest_step_and_restores_it_from_gcs(gcs, data_dir):
    directory = "gs://ckpt-bucket/run"
    iterator = _iterator(data_dir)
    writer = Checkpointer(directory, keep=1)
    for step in (1, 2):
        next(iterator)
        writer.save(step, *_state_at(step), iterator)
    writer.close()

    restored_iterator = _iterator(data_dir)
    reader = Checkpointer(directory, keep=1)
    params, train_state = _state_at(2)
    step, restored_params, restored_train_state = reader.restore(
        _abstract(params), _abstract(train_state), restored_iterator)
    reader.close()

    assert step == 2
    assert sorted(os.listdir(os.path.join(gcs.root_dir, "ckpt-bucket", "run"))) == ["2"]
    _assert_trees_equal(restored_params, params)
    _assert_trees_equal(restored_train_state, train_state)
    reference = _iterator(data_dir)
    next(reference), next(reference)
    _assert_trees_equal(next(restored_iterator), next(reference))


def test_checkpointer_sets_an_unreadable_step_aside_on_gcs(gcs, data_dir):
    directory = "gs://fallback-bucket/run"
    iterator = _iterator(data_dir)
    writer = Checkpointer(directory, keep=2)
    for step in (1, 2):
        writer.save(step, *_state_at(step), iterator)
    writer.close()
    run_dir = os.path.join(gcs.root_dir, "fallback-bucket", "run")
    os.remove(os.path.join(run_dir, "2", "params", "manifest.ocdbt"))

    reader = Checkpointer(directory, keep=2)
    params, train_state = _state_at(1)
    step, restored_params, _ = reader.restore(_abstract(params), _abstract(train_state), _iterator(data_dir))
    reader.close()

    assert step == 1
    _assert_trees_equal(restored_params, params)
    assert sorted(os.listdir(run_dir)) == ["1", "2.corrupt"]
    assert os.path.exists(os.path.join(run_dir, "2.corrupt", "train_state", "manifest.ocdbt"))


# --- the fakes themselves ---


def test_leaving_the_fakes_restores_the_environment_and_the_gs_filesystem(tmp_path, monkeypatch):
    # Before: another filesystem at gs://, none at gcs://.
    registry = importlib.import_module("fsspec.registry")._registry
    monkeypatch.setitem(registry, "gs", LocalFileSystem)
    monkeypatch.delitem(registry, "gcs", raising=False)
    env_before = {name: os.environ.get(name) for name in _ENV_NAMES}
    filesystems_before = {protocol: fsspec.registry.get(protocol) for protocol in ("gs", "gcs")}
    root_before = fake_gcs.FakeGCSFileSystem.root_dir
    probe_before = gcs_utils.is_hierarchical_namespace_enabled

    with fake_gcs.FakeGCSServer(tmp_path) as server, fake_gcs.install(tmp_path):
        assert os.environ["TENSORSTORE_GCS_HTTP_URL"] == server.url
        assert fake_gcs.FakeGCSFileSystem.root_dir == str(tmp_path)

    assert {name: os.environ.get(name) for name in _ENV_NAMES} == env_before
    assert {protocol: fsspec.registry.get(protocol) for protocol in ("gs", "gcs")} == filesystems_before
    assert fake_gcs.FakeGCSFileSystem.root_dir == root_before
    assert gcs_utils.is_hierarchical_namespace_enabled is probe_before


def test_child_process_launched_through_the_module_sees_the_same_bucket(gcs):
    code = ("import tensorstore as ts; from etils import epath; "
            "epath.Path('gs://child-bucket/by-epath.txt').write_text('epath'); "
            "ts.KvStore.open('gs://child-bucket/').result().write('by-tensorstore', b'tensorstore').result()")
    subprocess.run([sys.executable, fake_gcs.__file__, gcs.root_dir, "-c", code],
                   env={**os.environ, **gcs.env}, check=True, timeout=300)

    with urllib.request.urlopen(_media_url(gcs, "child-bucket", "by-epath.txt")) as response:
        assert response.read() == b"epath"
    assert epath.Path("gs://child-bucket/by-tensorstore").read_bytes() == b"tensorstore"
