"""The trainer never loses a run: non-finite steps are never applied or saved, a changed config is
refused without touching the workdir, corruption (a flipped bit) is told apart from a model change,
a failed restore leaves the data where it was, one trainer per workdir, clear one-line errors."""

import json
import logging
import os
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import (REPO, _FakeIterator, restore_raw, shared_run, smoke_config, smoke_workdir,  # noqa: F401
                        subprocess_env)

from moejax import parallel, trainer
from moejax.trainer import loop
from moejax.trainer.checkpoint import CheckpointMismatch, Checkpointer
from moejax.trainer.metrics_writer import read_metrics
from moejax.trainer import step as step_lib
from moejax.trainer.step import jit_train_step

pytestmark = pytest.mark.dtype_promotion("standard")


def snapshot(directory):
    """Every file under ``directory`` with its bytes."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


@pytest.fixture
def finished_run(smoke_workdir, tmp_path):  # noqa: F811
    workdir = tmp_path / "run"
    shutil.copytree(smoke_workdir, workdir)
    return workdir


# ---------------------------------------------------------------------- non-finite steps


def _poison_step(monkeypatch, bad_step):
    """Makes the update of step ``bad_step`` (0-based) non-finite: its batch weights become inf."""
    clean = step_lib.train_step

    def poisoned(state, rng_state, batch, **kwargs):
        scale = jnp.where(state["step"] == bad_step, jnp.inf, 1.0).astype(jnp.float32)
        return clean(state, rng_state, dict(batch, weights=batch["weights"] * scale), **kwargs)

    monkeypatch.setattr(step_lib, "train_step", poisoned)


def test_non_finite_run_stops_at_the_first_bad_step_and_keeps_only_finite_checkpoints(
        tmp_path, monkeypatch):
    # Step 4 is non-finite; a checkpoint every step, the loss logged only every 10: no checkpoint
    # may hold step 4, and the three kept must be the finite steps 1-3.
    _poison_step(monkeypatch, bad_step=3)
    workdir = tmp_path / "run"
    config = smoke_config("moe=False", checkpoint_every_steps=1, keep_checkpoints=3,
                          log_every_steps=10, eval_every_steps=100)
    # One dense layer: compiles fast.
    config.model.num_layers = 1
    with pytest.raises(FloatingPointError, match=r"step 4: loss nan, .* 1 non-finite step\(s\), "
                                                 r"more than skip_nonfinite_steps = 0; the step was "
                                                 r"not applied and the last checkpoint, step 3,"):
        trainer.run(config, str(workdir))
    steps = sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
    assert steps == [1, 2, 3]
    for step in steps:
        for leaf in jax.tree.leaves(restore_raw(str(workdir), step)):
            assert np.all(np.isfinite(leaf)), step
    assert not (workdir / "trainer.lock").exists()
    # The run resumes from step 3; allowed one skip, it passes the bad step and finishes.
    config.skip_nonfinite_steps = 1
    config.allow_new_config = True
    summary = trainer.run(config, str(workdir))
    assert summary["step"] == 6 and summary["nonfinite_steps"] == 1
    assert np.isfinite(summary["train_loss"]) and np.isfinite(summary["eval_loss"])
    for leaf in jax.tree.leaves(restore_raw(str(workdir), 6)):
        assert np.all(np.isfinite(leaf))


def test_a_non_finite_step_applies_no_update_and_is_counted():
    config = smoke_config()
    config.optimizer.warmup_steps = 0  # the first step updates (a warmup starts from 0)
    setup = trainer.setup(config)
    with parallel.use_mesh(setup.mesh, setup.rules):
        step = jit_train_step(setup, donate=False)
        batch = {"inputs": jnp.full((8, 32), 5, jnp.int32), "targets": jnp.full((8, 32), 6, jnp.int32),
                 "weights": jnp.ones((8, 32), jnp.float32)}
        good, metrics = step(setup.state, setup.rng_state, batch)
        bad_batch = dict(batch, weights=batch["weights"].at[0, 0].set(jnp.inf))
        bad, bad_metrics = step(good, setup.rng_state, bad_batch)
    assert int(metrics["nonfinite_steps"]) == 0 and int(bad_metrics["nonfinite_steps"]) == 1
    assert not np.isfinite(float(bad_metrics["train_total_loss"]))
    assert int(bad["step"]) == 2  # the batch is consumed
    for name in ("params", "opt_state", "rest"):
        jax.tree.map(np.testing.assert_array_equal, bad[name], good[name])
    assert not all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.all(a == b)),
                                                good["params"], setup.state["params"])))


def test_the_error_names_float16_when_the_model_computes_in_it():
    config = trainer.complete_config(smoke_config(model=dict(smoke_config().model,
                                                             dtype="float16")))
    monitor = loop._Monitor(config, writer=None, checkpointer=type(
        "C", (), {"all_steps": staticmethod(lambda: [])})())
    message = monitor._nonfinite_message(
        4, {"train_total_loss": jnp.float32(jnp.nan), "grad_norm": jnp.float32(jnp.inf)}, 1)
    assert "step 4" in message and "float16" in message and "bfloat16" in message
    assert "no checkpoint was written" in message


def test_diverging_evaluations_warn(capsys):
    from rich.console import Console

    monitor = loop._Monitor(trainer.complete_config(smoke_config()), None, None)
    console = Console(soft_wrap=True)
    for step, loss in enumerate([5.5, 3.0, 6.5, 7.0, 3934.0]):
        monitor.watch_divergence(step, loss, console)
    out = capsys.readouterr().out
    assert out.count("warning:") == 2 and "step 3: eval loss 7.0000" in out
    assert "best (3.0000)" in out


# ---------------------------------------------------------------------- changed config, corruption


@pytest.mark.parametrize("change, key", [
    (lambda c: c.model.update(d_model=64), "model.d_model: 32 -> 64"),
    (lambda c: c.moe.update(num_experts=8), "moe.num_experts: 4 -> 8"),
    (lambda c: setattr(c, "batch_size", 16), "batch_size: 8 -> 16"),
    (lambda c: c.optimizer.update(learning_rate=0.5), "optimizer.learning_rate: 0.01 -> 0.5"),
])
def test_resume_with_a_changed_config_is_refused_and_touches_nothing(finished_run, change, key):
    before = snapshot(finished_run)
    config = smoke_config(num_train_steps=9)
    change(config)
    with pytest.raises(ValueError, match=key.replace(".", r"\.").replace("(", r"\(")):
        trainer.run(config, str(finished_run))
    assert snapshot(finished_run) == before


def test_a_key_added_to_the_schema_since_the_run_started_counts_as_its_default(tmp_path):
    from etils import epath

    from moejax.trainer import workdir as workdir_lib

    config = trainer.complete_config(smoke_config())
    saved = config.to_dict()
    del saved["stream_data"]  # a config.json written before the key existed
    (tmp_path / "config.json").write_text(json.dumps(saved))
    workdir_lib.check_config_unchanged(epath.Path(tmp_path), config, resuming=True)
    streamed = trainer.complete_config(smoke_config(stream_data=True))
    with pytest.raises(ValueError, match=r"stream_data: False -> True; these keys fix"):
        workdir_lib.check_config_unchanged(epath.Path(tmp_path), streamed, resuming=True)


def test_allow_new_config_accepts_a_new_learning_rate(finished_run):
    config = smoke_config()  # already trained to step 6: restores, trains nothing
    config.optimizer.learning_rate = 0.5
    config.allow_new_config = True
    assert trainer.run(config, str(finished_run))["step"] == 6
    assert json.loads((finished_run / "config.json").read_text())["optimizer"][
        "learning_rate"] == 0.5


def test_a_checkpoint_of_another_model_is_refused_not_set_aside(finished_run):
    (finished_run / "config.json").unlink()  # a run from before config.json: only orbax's metadata
    before = snapshot(finished_run)
    config = smoke_config(num_train_steps=9)
    config.model.d_model = 64
    with pytest.raises(CheckpointMismatch, match=r"different model: params .*w_q: saved "
                                                 r"\(32, 2, 16\) float32, model \(64, 2, 32\) float32"):
        trainer.run(config, str(finished_run))
    assert snapshot(finished_run) == before


def _save_two_steps(directory):
    w = jnp.asarray(np.random.default_rng(0).normal(size=(64, 64)), jnp.float32)
    ckpt = Checkpointer(directory, keep=5)
    for step in (1, 2):
        ckpt.save(step, {"w": w + step}, {"step": jnp.asarray(step)}, _FakeIterator(b"data%d" % step))
    ckpt.close()
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return ({"w": jax.ShapeDtypeStruct((64, 64), jnp.float32, sharding=sharding)},
            {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding)}, w)


def test_a_flipped_bit_in_the_parameters_is_caught_by_the_checksum(tmp_path):
    abstract_params, abstract_state, w = _save_two_steps(tmp_path)
    files = [os.path.join(root, name) for root, _, names in os.walk(tmp_path / "2" / "params")
             for name in names]
    biggest = max(files, key=os.path.getsize)  # the array data
    data = bytearray(open(biggest, "rb").read())
    data[len(data) // 2] ^= 0x10
    open(biggest, "wb").write(data)
    iterator = _FakeIterator()
    step, params, _ = Checkpointer(tmp_path, keep=5).restore(abstract_params, abstract_state,
                                                             iterator)
    assert step == 1 and iterator.state == b"data1"
    np.testing.assert_array_equal(params["w"], w + 1)
    assert sorted(os.listdir(tmp_path)) == ["1", "2.corrupt"]


def test_when_no_checkpoint_restores_the_data_iterator_is_untouched(tmp_path):
    abstract_params, abstract_state, _ = _save_two_steps(tmp_path)
    for step in ("1", "2"):
        for root, _, names in os.walk(tmp_path / step / "train_state"):
            for name in names:
                with open(os.path.join(root, name), "wb") as f:
                    f.write(b"garbage")
    iterator = _FakeIterator()
    assert Checkpointer(tmp_path, keep=5).restore(abstract_params, abstract_state, iterator) is None
    assert iterator.state == b"s0"
    assert sorted(os.listdir(tmp_path)) == ["1.corrupt", "2.corrupt"]


# ---------------------------------------------------------------------- workdir


def test_a_second_trainer_on_a_workdir_in_use_fails_naming_the_first(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        tmp_path.joinpath("trainer.lock").write_text(
            json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        before = snapshot(tmp_path)
        with pytest.raises(ValueError, match=f"in use by another trainer \\(pid {holder.pid} on "):
            trainer.run(smoke_config(), str(tmp_path))
        assert snapshot(tmp_path) == before
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_of_a_dead_trainer_is_taken_over(finished_run):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (finished_run / "trainer.lock").write_text(
        json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    assert trainer.run(smoke_config(), str(finished_run))["step"] == 6  # nothing left to train
    assert not (finished_run / "trainer.lock").exists()


def test_unwritable_checkpoints_fail_at_once(tmp_path):
    (tmp_path / "checkpoints").write_text("")  # cannot hold a checkpoint
    with pytest.raises(ValueError, match="is not writable"):
        trainer.run(smoke_config(), str(tmp_path))


def test_a_torn_last_metrics_row_is_dropped_with_a_warning_naming_the_file(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "eval_loss": 5.5}\n{"step": 1, "train_loss": 5.4}\n{"step": 2, "tr')
    with caplog.at_level(logging.WARNING):
        assert read_metrics(tmp_path) == [{"step": 0, "eval_loss": 5.5},
                                          {"step": 1, "train_loss": 5.4}]
    assert str(path) in caplog.text and "line 3" in caplog.text
    path.write_text('{"step": 0}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=f"{path}, line 2: not a JSON row"):
        read_metrics(tmp_path)


@pytest.mark.parametrize("config_file, message", [
    ("experiments/no_such_config.py", "error: cannot load --config: [Errno 2] No such file"),
    ("BROKEN", "error: SyntaxError"),
])
def test_a_missing_or_broken_config_file_is_a_one_line_error(config_file, message, tmp_path,
                                                             tmp_path_factory):
    if config_file == "BROKEN":
        config_file = tmp_path / "broken.py"
        config_file.write_text("def get_config(:\n")
    result = subprocess.run([sys.executable, "-m", "moejax.main", f"--config={config_file}",
                             f"--workdir={tmp_path / 'run'}"], cwd=REPO,
                            env=subprocess_env(tmp_path_factory), capture_output=True, text=True)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert [line for line in lines if line.startswith("error:")] == lines[-1:]
    assert message in lines[-1] and "Traceback" not in result.stderr, result.stderr
