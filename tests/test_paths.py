"""Run directories: local paths made absolute, URIs kept, and the local mirror of a remote directory."""

import os

import pytest
from etils import epath

from moejax import paths

from fake_gcs import install


@pytest.mark.parametrize("path", ["gs://bucket/runs/a", "s3://b/x", "hf://datasets/x"])
def test_uris_are_remote_and_kept_as_they_are(path):
    assert paths.is_remote(path)
    assert os.fspath(paths.resolve(path)) == path


@pytest.mark.parametrize("path", ["runs/a", "/tmp/x", "./gs:/odd", "file.txt"])
def test_local_paths_are_not_remote_and_made_absolute(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not paths.is_remote(path)
    assert os.fspath(paths.resolve(path)) == os.path.abspath(path)


def test_empty_workdir_is_an_error():
    with pytest.raises(ValueError, match="workdir must not be empty"):
        paths.resolve("")


def test_a_local_target_is_its_own_mirror(tmp_path):
    mirror = paths.Mirror(epath.Path(tmp_path), fetch=("metrics.jsonl",))
    assert mirror.local == epath.Path(tmp_path)
    (mirror.local / "f.txt").write_text("x")
    mirror.close()
    assert (tmp_path / "f.txt").read_text() == "x"


@pytest.fixture
def bucket(tmp_path):
    with install(tmp_path / "gcs"):
        yield tmp_path / "gcs" / "bucket"


def test_a_remote_mirror_fetches_then_uploads_only_what_changed(bucket):
    target = epath.Path("gs://bucket/run")
    (target / "tensorboard").mkdir(parents=True, exist_ok=True)
    (target / "metrics.jsonl").write_text('{"step": 1}\n')
    (target / "tensorboard" / "events.1").write_bytes(b"old events")
    (target / "loss.png").write_bytes(b"not fetched")

    mirror = paths.Mirror(target, fetch=("metrics.jsonl", "tensorboard", "missing.txt"))
    local = mirror.local
    assert not paths.is_remote(local)
    assert sorted(os.path.relpath(os.path.join(r, f), local)
                  for r, _, fs in os.walk(local) for f in fs) == [
        "metrics.jsonl", os.path.join("tensorboard", "events.1")]
    assert (local / "metrics.jsonl").read_text() == '{"step": 1}\n'

    with open(local / "metrics.jsonl", "a") as f:
        f.write('{"step": 2}\n')
    (local / "tensorboard" / "events.2").write_bytes(b"new events")
    # An unchanged file is not written again: make the remote copy differ, it must stay so.
    (bucket / "run" / "tensorboard" / "events.1").write_bytes(b"changed remotely")
    mirror.sync()
    assert (bucket / "run" / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'
    assert (bucket / "run" / "tensorboard" / "events.2").read_bytes() == b"new events"
    assert (bucket / "run" / "tensorboard" / "events.1").read_bytes() == b"changed remotely"

    mirror.close()
    assert not os.path.exists(local)


def test_error_line_gives_one_line_for_a_config_error():
    from moejax.paths import error_line

    wrapped = ValueError("flag --config=x.py: Error whilst parsing config file:\n\nTraceback (most "
                         "recent call last):\n  File \"x.py\", line 3\nValueError: bad slice")
    assert error_line(wrapped) == "flag --config=x.py: Error whilst parsing config file: ValueError: bad slice"
    assert error_line(KeyError("'seq_lenn'\nDid you mean \"seq_len\"?")) == (
        'seq_lenn Did you mean "seq_len"?')
    assert error_line(ValueError("plain message")) == "plain message"
