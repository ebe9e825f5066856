"""The trainer: a smoke run learns and writes its artifacts; exact resume after SIGKILL; SIGTERM saves;
instruction tuning with frozen parameter groups; checkpoint fallback; clear errors on bad input.

Runs that several tests read are made once per test session (also across pytest-xdist workers).
Every test process shares one persistent compilation cache (tests/conftest.py), so a program is
compiled once.
"""

import contextlib
import fcntl
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import scipy.special
from flax import nnx
from tensorboardX.proto import event_pb2

from experiments import smoke
from moejax import trainer
from moejax.models import Transformer
from moejax.trainer.checkpoint import Checkpointer
from moejax.trainer.config import complete_config, make_model_config
from moejax.trainer.metrics_writer import read_metrics
from moejax.trainer.state import make_optimizer, param_group

# The trainer uses optax, which relies on implicit dtype promotion (float ** int32 step counts).
pytestmark = pytest.mark.dtype_promotion("standard")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_config(arg=None, **overrides) -> ml_collections.ConfigDict:
    """``experiments/smoke.py`` (``arg="moe=False"``: its dense model) with ``overrides``."""
    config = smoke.get_config(arg)
    config.update(overrides)
    return config


@contextlib.contextmanager
def _locked(path):
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def session_root(tmp_path_factory):
    """A directory of this test session that all pytest-xdist workers share."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def shared_run(tmp_path_factory, name, make_config):
    """Workdir of an in-process run made once for all workers of this test session."""
    root = session_root(tmp_path_factory)
    workdir = root / name
    with _locked(root / f"{name}.lock"):
        if not (root / f"{name}.done").exists():
            trainer.run(make_config(), str(workdir))
            (root / f"{name}.done").write_text("ok")
    return str(workdir)


@pytest.fixture(scope="module")
def smoke_workdir(tmp_path_factory):
    return shared_run(tmp_path_factory, "smoke_run", smoke_config)


def subprocess_env(tmp_path_factory, devices=2):
    del tmp_path_factory  # the persistent compilation cache is conftest's, in os.environ
    env = dict(os.environ)
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    return env


def main_command(workdir, *flags):
    return [sys.executable, "-m", "moejax.main", "--config=experiments/smoke.py",
            f"--workdir={workdir}", *flags]


def restore_raw(workdir, step):
    """The saved params of ``step`` as NumPy arrays (no target: read back as stored)."""
    path = os.path.join(workdir, "checkpoints", str(step), "params")
    checkpointer = ocp.PyTreeCheckpointer()
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                            checkpointer.metadata(path).item_metadata.tree)
    return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))


def tensorboard_events(workdir):
    logdir = os.path.join(workdir, "tensorboard")
    for name in sorted(os.listdir(logdir)):
        with open(os.path.join(logdir, name), "rb") as f:
            data = f.read()
        offset = 0
        while offset < len(data):  # TFRecord: length, crc, payload, crc
            (length,) = struct.unpack("<Q", data[offset: offset + 8])
            yield event_pb2.Event.FromString(data[offset + 12: offset + 12 + length])
            offset += 16 + length


def tensorboard_tags(workdir):
    return {value.tag for event in tensorboard_events(workdir) for value in event.summary.value}


# ---------------------------------------------------------------------- smoke run


def test_smoke_training_lowers_train_and_eval_loss(smoke_workdir):
    rows = read_metrics(smoke_workdir)
    train_losses = [row["train_loss"] for row in rows if "train_loss" in row]
    eval_losses = [row["eval_loss"] for row in rows if "eval_loss" in row]
    assert len(train_losses) == 6 and len(eval_losses) == 3
    assert np.mean(train_losses[-2:]) < np.mean(train_losses[:2]) - 0.3
    assert eval_losses[-1] < eval_losses[0]


def test_metrics_jsonl_has_a_row_per_logged_step_and_per_evaluation(smoke_workdir):
    rows = read_metrics(smoke_workdir)
    assert [row["step"] for row in rows if "train_loss" in row] == [1, 2, 3, 4, 5, 6]
    evals = [row for row in rows if "eval_loss" in row]
    assert [row["step"] for row in evals] == [0, 3, 6]
    load = np.asarray(evals[-1]["eval_expert_load"])
    assert load.shape == (2, 4)  # 2 MoE layers x 4 experts, shares of the routed tokens
    np.testing.assert_allclose(load.sum(axis=1), [1.0, 1.0], rtol=1e-6)
    assert evals[-1]["eval_perplexity"] == pytest.approx(np.exp(evals[-1]["eval_loss"]), rel=1e-6)


def test_smoke_run_writes_checkpoints_tensorboard_events_and_plots(smoke_workdir):
    assert sorted(os.listdir(os.path.join(smoke_workdir, "checkpoints"))) == ["3", "6"]
    tags = tensorboard_tags(smoke_workdir)
    assert {"train_loss", "eval_loss", "learning_rate", "train_load_cv/moe_layer_1"} <= tags
    for plot in ("loss.png", "expert_load.png"):
        with open(os.path.join(smoke_workdir, plot), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------- preemption


def test_run_killed_after_a_checkpoint_and_restarted_ends_bit_identical(tmp_path,
                                                                         tmp_path_factory):
    env = subprocess_env(tmp_path_factory)
    flags = ["--config.num_train_steps=12", "--config.checkpoint_every_steps=2",
             "--config.eval_every_steps=12", "--config.log_every_steps=4"]
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    subprocess.run(main_command(reference, *flags), cwd=REPO, env=env, check=True,
                   capture_output=True)

    process = subprocess.Popen(main_command(resumed, *flags), cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = resumed / "checkpoints" / "2" / "commit_success.txt"
    deadline = time.monotonic() + 120
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (resumed / "checkpoints" / "12").exists(), "the run ended before it was killed"

    restarted = subprocess.run(main_command(resumed, *flags), cwd=REPO, env=env, check=True,
                               capture_output=True, text=True)
    assert "Resumed from" in restarted.stdout

    def final_rows(workdir):  # everything but the wall-clock speeds
        return [{k: v for k, v in row.items() if k not in ("steps_per_sec", "tokens_per_sec")}
                for row in read_metrics(str(workdir)) if row["step"] == 12]

    assert len(final_rows(reference)) == 2  # the train row and the eval row of the last step
    assert final_rows(resumed) == final_rows(reference)
    steps = [row["step"] for row in read_metrics(str(resumed)) if "train_loss" in row]
    assert steps == sorted(set(steps)), "metrics.jsonl repeats steps after the restart"
    want, got = restore_raw(str(reference), 12), restore_raw(str(resumed), 12)
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, tmp_path_factory):
    workdir = tmp_path / "run"
    process = subprocess.Popen(
        main_command(workdir, "--config.num_train_steps=100000",
                     "--config.checkpoint_every_steps=100000", "--config.eval_every_steps=100000"),
        cwd=REPO, env=subprocess_env(tmp_path_factory), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    metrics = workdir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline and (
            not metrics.exists() or metrics.read_text().count("\n") < 3):
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-2000:]
    saved = [int(step) for step in os.listdir(workdir / "checkpoints")]
    assert len(saved) == 1 and 3 <= saved[0] < 100000
    assert f"SIGTERM at step {saved[0]}" in stdout


@pytest.mark.slow
def test_two_processes_of_four_devices_give_the_losses_of_one_process_of_eight(
        smoke_workdir, tmp_path, tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    processes = []
    for process_id in range(2):
        env = subprocess_env(tmp_path_factory, devices=4)
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(process_id))
        # Three steps of the smoke run: warmup ends at step 2, so the learning rates of steps 1-3
        # do not depend on the run's length and the losses are comparable.
        flags = ["--config.num_train_steps=3", "--config.eval_every_steps=3"]
        processes.append(subprocess.Popen(main_command(tmp_path, *flags), cwd=REPO, env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True))
    outputs = [process.communicate(timeout=300)[0] for process in processes]
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-3000:]
    assert "8 device(s) {'data': 8, 'fsdp': 1, 'expert': 1, 'tensor': 1}, 2 process(es)" in outputs[0]

    def losses(workdir):
        return [(row["step"], row.get("train_loss", row.get("eval_loss")))
                for row in read_metrics(workdir)]

    one = [(step, loss) for step, loss in losses(smoke_workdir) if step <= 3]
    two = losses(str(tmp_path))
    assert [step for step, _ in two] == [0, 1, 2, 3, 3] == [step for step, _ in one]
    np.testing.assert_allclose([loss for _, loss in two], [loss for _, loss in one], rtol=1e-5)


# ---------------------------------------------------------------------- object-storage workdir


def test_a_gs_workdir_trains_like_a_local_one_and_resumes_from_the_bucket(smoke_workdir, tmp_path):
    from fake_gcs import FakeGCSServer, install

    root = tmp_path / "gcs"
    with FakeGCSServer(root), install(root):
        trainer.run(smoke_config(), "gs://bucket/run")
        run = root / "bucket" / "run"
        first = read_metrics(str(run))
        assert sorted(os.listdir(run / "checkpoints")) == ["3", "6"]
        # Resuming reads the checkpoint, metrics and events back from the bucket.
        trainer.run(smoke_config(num_train_steps=9), "gs://bucket/run")
        # One step suffices: only its step-0 evaluation is read.
        trainer.run(smoke_config(num_train_steps=1, init_from="gs://bucket/run"),
                    str(tmp_path / "tuned"))

    local = read_metrics(smoke_workdir)
    assert [row["step"] for row in first] == [row["step"] for row in local]
    np.testing.assert_allclose([row.get("train_loss", row.get("eval_loss")) for row in first],
                               [row.get("train_loss", row.get("eval_loss")) for row in local],
                               rtol=1e-6)
    resumed = read_metrics(str(run))
    assert resumed[:len(first)] == first
    assert [row["step"] for row in resumed if "eval_loss" in row] == [0, 3, 6, 9]
    assert sorted(os.listdir(run / "checkpoints")) == ["3", "6", "9"]
    assert (run / "loss.png").stat().st_size > 0 and (run / "expert_load.png").stat().st_size > 0
    steps = {event.step for event in tensorboard_events(str(run))
             if any(value.tag == "train_loss" for value in event.summary.value)}
    assert steps == set(range(1, 10))
    # Fine-tuning from the bucket starts at the bucket's step-9 parameters.
    final_eval = [row for row in resumed if "eval_loss" in row][-1]
    tuned_start = read_metrics(str(tmp_path / "tuned"))[0]
    assert tuned_start["step"] == 0
    assert tuned_start["eval_loss"] == pytest.approx(final_eval["eval_loss"], rel=1e-6)


# ---------------------------------------------------------------------- instruction tuning


def test_instruction_tuning_with_a_frozen_router_changes_experts_but_not_the_router(
        smoke_workdir, tmp_path):
    config = smoke_config(
        dataset="instruct_synth", seq_len=128, num_train_steps=2, eval_every_steps=2,
        checkpoint_every_steps=2, init_from=smoke_workdir, freeze="router",
        instruct_eval=dict(families=("min",), num_examples=2, max_new_tokens=2))
    summary = trainer.run(config, str(tmp_path))
    assert 0.0 <= summary["eval_exact_match/min"] <= 1.0
    before, after = restore_raw(smoke_workdir, 6), restore_raw(str(tmp_path), 2)
    for layer in ("0", "1"):
        np.testing.assert_array_equal(after["layers"][layer]["ffn"]["router"]["w_router"],
                                      before["layers"][layer]["ffn"]["router"]["w_router"])
        assert not np.array_equal(after["layers"][layer]["ffn"]["experts"]["w_in"],
                                  before["layers"][layer]["ffn"]["experts"]["w_in"])


def _answer_loss_reference(model, family, n, seed):
    """Mean cross-entropy over answer and EOS tokens, each example alone, in NumPy.

    Each example is followed by filler tokens up to ``max_len`` (one compiled shape); the model is
    causal, so they do not change the logits of the example's own positions.
    """
    from moejax import data
    from moejax.data import instruct_synth

    total, count = 0.0, 0
    for prompt, answer in instruct_synth.make_examples(family, n, seed):
        prompt_ids, answer_ids = data.encode(prompt), data.encode(answer)
        tokens = np.concatenate([[data.BOS_ID], prompt_ids, answer_ids, [data.EOS_ID]])
        inputs = np.full(model.config.max_len, 7, np.int32)
        inputs[:len(tokens) - 1] = tokens[:-1]
        logits, _ = model(jnp.asarray(inputs[None]))
        log_probs = scipy.special.log_softmax(np.asarray(logits[0], np.float64), axis=-1)
        answer_positions = np.arange(len(prompt_ids), len(tokens) - 1)
        total -= log_probs[answer_positions, tokens[answer_positions + 1]].sum()
        count += len(answer_positions)
    return total / count


def test_single_task_fine_tuning_reads_the_chosen_splits_and_scores_answer_loss(
        smoke_workdir, tmp_path):
    # 3 examples in batches of 8: one padded batch.
    config = smoke_config(
        dataset="instruct_synth", train_split="task_min", eval_split="eval_min", seq_len=128,
        num_train_steps=2, eval_every_steps=2, checkpoint_every_steps=2, init_from=smoke_workdir,
        instruct_eval=dict(families=("min", "max"), num_examples=3, max_new_tokens=2, seed=4))
    summary = trainer.run(config, str(tmp_path))
    model_config = make_model_config(complete_config(config))
    model = Transformer(model_config, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(params, restore_raw(str(tmp_path), 2))
    nnx.update(model, params)
    model.eval()
    for family in ("min", "max"):
        np.testing.assert_allclose(summary[f"eval_answer_loss/{family}"],
                                   _answer_loss_reference(model, family, 3, seed=4), rtol=1e-4)
    assert summary["eval_answer_loss/min"] != summary["eval_answer_loss/max"]


def test_unknown_train_split_is_named_in_the_error(tmp_path):
    config = smoke_config(dataset="instruct_synth", train_split="task_divide", seq_len=128)
    with pytest.raises(ValueError, match="unknown split 'task_divide' of 'instruct_synth'"):
        trainer.run(config, str(tmp_path))


@pytest.mark.parametrize("freeze", ["router", "experts", "non_expert"])
def test_freeze_zeroes_the_updates_of_exactly_that_parameter_group(freeze):
    model_config = make_model_config(complete_config(smoke_config()))
    params = nnx.state(Transformer(model_config, rngs=nnx.Rngs(0)), nnx.Param)
    config = complete_config(smoke_config(freeze=freeze))
    tx = make_optimizer(config, lambda step: 1e-2, params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = jax.jit(lambda g, p: tx.update(g, tx.init(p), p))(grads, params)
    flat = jax.tree_util.tree_leaves_with_path(updates)
    groups = {param_group(path) for path, _ in flat}
    assert groups == {"router", "experts", "non_expert"}
    for path, update in flat:
        frozen = param_group(path) == freeze
        assert bool(jnp.all(update == 0)) == frozen, jax.tree_util.keystr(path)


# ---------------------------------------------------------------------- checkpoints


class _FakeIterator:
    def __init__(self, state=b"s0"):
        self.state = state

    def get_state(self):
        return self.state

    def set_state(self, state):
        self.state = state


def test_corrupted_latest_checkpoint_falls_back_to_the_previous_one_and_is_kept(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=5)
    tree = lambda v: {"w": jnp.full((4,), v, jnp.float32)}  # noqa: E731
    for step in (1, 2):
        ckpt.save(step, tree(step), {"step": jnp.asarray(step)}, _FakeIterator(b"data%d" % step))
    ckpt.close()
    for root, _, files in os.walk(tmp_path / "2" / "params"):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")

    ckpt = Checkpointer(tmp_path, keep=5)
    iterator = _FakeIterator()
    abstract = jax.ShapeDtypeStruct((4,), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(
        jax.devices()[0]))
    step, params, train_state = ckpt.restore({"w": abstract}, {"step": jax.ShapeDtypeStruct(
        (), jnp.int32, sharding=abstract.sharding)}, iterator)
    assert step == 1 and iterator.state == b"data1"
    np.testing.assert_array_equal(params["w"], np.ones(4))
    assert sorted(os.listdir(tmp_path)) == ["1", "2.corrupt"]
    ckpt.save(2, tree(7), {"step": jnp.asarray(2)}, iterator)  # step 2 can be written again
    ckpt.close()
    assert sorted(os.listdir(tmp_path)) == ["1", "2", "2.corrupt"]


# ---------------------------------------------------------------------- tokenizers


def test_a_sentencepiece_run_sizes_the_model_to_its_vocabulary_and_resumes(tmp_path):
    from moejax import data
    from moejax.data import train_tokenizer

    data_dir = str(tmp_path / "tfds")
    model_path = tmp_path / "sp.model"
    model_path.write_bytes(train_tokenizer.train_sentencepiece(
        train_tokenizer.dataset_texts("stdlib_text/small", data_dir=data_dir), vocab_size=400,
        num_threads=1))
    spec = f"sentencepiece:{model_path}"
    tokenizer = data.get_tokenizer(spec)
    assert tokenizer.vocab_size == 512  # 400 pieces, padded: not the byte vocabulary's 384
    config = smoke_config("moe=False", dataset="stdlib_text/small", data_dir=data_dir,
                          tokenizer=spec, num_train_steps=3, checkpoint_every_steps=2,
                          eval_every_steps=3)
    # One dense layer: compiles fast.
    config.model.num_layers = 1
    workdir = tmp_path / "run"
    summary = trainer.run(config, str(workdir))
    assert summary["step"] == 3 and np.isfinite(summary["train_loss"])
    assert np.isfinite(summary["eval_loss"])
    saved = restore_raw(str(workdir), 3)
    assert saved["embed"].shape == (512, 32) and saved["lm_head"].shape == (32, 512)
    # The data went through the tokenizer: its token streams are cached under the data_dir.
    assert any(tokenizer.name in entry for entry in os.listdir(data.default_cache_dir(data_dir)))
    # Resuming from step 2 trains step 3 again, bit for bit.
    shutil.rmtree(workdir / "checkpoints" / "3")
    resumed = trainer.run(config, str(workdir))
    assert resumed["step"] == 3 and resumed["train_loss"] == summary["train_loss"]
    jax.tree.map(np.testing.assert_array_equal, restore_raw(str(workdir), 3), saved)


def test_stream_data_streams_the_trainers_data_and_resumes_from_the_streamed_state(tmp_path,
                                                                                   monkeypatch):
    import base64
    import json

    from moejax import data

    calls = []
    create_iterator = data.create_iterator

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return create_iterator(*args, **kwargs)

    monkeypatch.setattr(data, "create_iterator", recording)
    config = smoke_config("moe=False", dataset="stdlib_text/small", data_dir=str(tmp_path / "tfds"),
                          stream_data=True, num_train_steps=2, checkpoint_every_steps=1,
                          eval_every_steps=2)
    config.model.num_layers = 1  # one dense layer: compiles fast
    workdir = tmp_path / "run"
    summary = trainer.run(config, str(workdir))
    assert summary["step"] == 2 and np.isfinite(summary["train_loss"])
    assert [(c["split"], c["stream"]) for c in calls] == [("train", True), ("validation", True)]
    state = base64.b64decode((workdir / "checkpoints" / "2" / "data" / "process_0-of-1.b64")
                             .read_bytes())
    assert json.loads(state)["pipeline"]["stream"] is True
    # Resuming from step 1 sets the streamed state and trains step 2 again, bit for bit.
    shutil.rmtree(workdir / "checkpoints" / "2")
    resumed = trainer.run(config, str(workdir))
    assert resumed["step"] == 2 and resumed["train_loss"] == summary["train_loss"]
    # A run may not switch between streamed and indexed data.
    config.stream_data = False
    with pytest.raises(ValueError, match="stream_data: True -> False"):
        trainer.run(config, str(workdir))


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize("overrides, message", [
    (dict(seq_len=0), "config.seq_len must be a positive int"),
    (dict(batch_size=-8), "config.batch_size must be a positive int"),
    (dict(batch_size=12), "batch_size = 12 is not divisible by the data-parallel size 8"),
    (dict(num_train_step=3), "config.num_train_step is not a known key; did you mean "
                             "'num_train_steps'"),
    (dict(optimizer=dict(lerning_rate=1.0)), "config.optimizer.lerning_rate is not a known key"),
    (dict(moe=dict(num_expert=4)), "config.moe.num_expert is not a known key"),
    (dict(freeze="gate"), "config.freeze must be one of"),
    # Optimizer and schedule values that would train in the wrong direction or not at all.
    (dict(optimizer=dict(grad_clip_norm=-1.0)), "config.optimizer.grad_clip_norm must be a finite "
                                                "number > 0, got -1.0"),
    (dict(optimizer=dict(end_learning_rate_ratio=-5.0)), "config.optimizer.end_learning_rate_ratio"
                                                         " must be a finite number in [0, 1]"),
    (dict(optimizer=dict(b2=1.5)), "config.optimizer.b2 must be a finite number in [0, 1)"),
    (dict(optimizer=dict(weight_decay=-1.0)), "config.optimizer.weight_decay must be a finite"),
    (dict(optimizer=dict(learning_rate=float("nan"))), "config.optimizer.learning_rate must be"),
    (dict(optimizer=dict(eps=0.0)), "config.optimizer.eps must be a finite number > 0"),
    (dict(optimizer=dict(warmup_steps=2.5)), "config.optimizer.warmup_steps must be an int >= 0"),
    (dict(router_bias_update_rate=-1.0), "config.router_bias_update_rate must be"),
    (dict(skip_nonfinite_steps=-1), "config.skip_nonfinite_steps must be an int >= 0"),
    (dict(tokenizer=""), "config.tokenizer must be 'byte', 'sentencepiece:<path to .model>' or "
                         "'hf:<path to tokenizer.json>', got ''"),
    (dict(tokenizer="sentencepiece:"), "config.tokenizer must be 'byte', 'sentencepiece:"),
    (dict(tokenizer="sentencepiece:/no/such.model"), "config.tokenizer = 'sentencepiece:/no/such."
                                                      "model': tokenizer file '/no/such.model'"),
    (dict(vocab_size=300), "config.vocab_size must be None or a positive multiple of 128"),
    (dict(vocab_size=256), "config.vocab_size = 256 is smaller than the vocabulary of tokenizer "
                           "'byte' (384 ids"),
    (dict(moe=dict(router="hash", experts_per_token=1, hash_vocab_size=100)),
     "config.moe.hash_vocab_size = 100 is smaller than the model's vocab_size 384"),
])
def test_bad_config_raises_a_clear_error(overrides, message, tmp_path):
    config = smoke_config().to_dict()  # a plain dict: the trainer itself must catch the key
    for key, value in overrides.items():
        config[key] = {**config[key], **value} if isinstance(config.get(key), dict) else value
    with pytest.raises(ValueError, match=re.escape(message)):
        trainer.run(config, str(tmp_path))
    assert not os.listdir(tmp_path)


def test_unknown_dataset_error_lists_the_available_ones(tmp_path):
    with pytest.raises(ValueError, match="stdlib_text"):
        trainer.run(smoke_config(dataset="no_such_corpus"), str(tmp_path))


def test_unwritable_workdir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="is not writable"):
        trainer.run(smoke_config(), str(blocker / "run"))


def test_command_line_override_of_a_missing_key_fails_naming_it(tmp_path, tmp_path_factory):
    result = subprocess.run(main_command(tmp_path, "--config.no_such_key=1"), cwd=REPO,
                            env=subprocess_env(tmp_path_factory), capture_output=True, text=True)
    assert result.returncode != 0
    assert "no_such_key" in result.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_fine_tuning_starts_from_a_hugging_face_checkpoint(tmp_path):
    """``init_from="hf:<dir>"``: the architecture comes from its config.json, the parameters from its
    safetensors (the first step's learning rate is 0 in warm-up, so step 1 still holds them)."""
    import tokenizers
    from tokenizers import models, pre_tokenizers, trainers

    from moejax.models import hf

    fixture = os.path.join(REPO, "tests", "fixtures", "hf", "qwen3_moe")
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["def return import class self none true false for in if else"] * 8,
                            trainers.BpeTrainer(vocab_size=56, limit_alphabet=30, special_tokens=[
                                "<pad>", "<s>", "</s>", "<unk>"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    config = smoke_config(dataset="stdlib_text/small", data_dir=str(tmp_path / "tfds"),
                          tokenizer=f"hf:{tmp_path / 'tokenizer.json'}", init_from=f"hf:{fixture}",
                          num_train_steps=1, checkpoint_every_steps=1, eval_every_steps=1,
                          seq_len=16)
    config.model = dict(dtype="float32", param_dtype="float32")
    config.moe = dict(dispatch="dense")
    config.optimizer.warmup_steps = 5
    summary = trainer.run(config, str(tmp_path / "run"))
    assert summary["step"] == 1 and np.isfinite(summary["train_loss"])
    _, want = hf.load(fixture, param_dtype=jnp.float32)
    def flat(tree):
        return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
                for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}

    got, want = flat(restore_raw(str(tmp_path / "run"), 1)), flat(nnx.to_pure_dict(want))
    assert sorted(got) == sorted(want) and len(got) > 10
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)

    config.model = dict(d_model=64)
    with pytest.raises(ValueError, match=r"config.model.d_model is fixed by the checkpoint"):
        trainer.run(config, str(tmp_path / "other"))


def test_an_upcycled_moe_run_starts_with_the_dense_runs_evaluation_loss(tmp_path):
    """``upcycle=True``: every expert is a copy of the dense FFN and the router starts at zero, so
    the top-2 gates are 1/2 + 1/2 and the step-0 evaluation equals the dense run's last one."""
    data_dir = str(tmp_path / "tfds")
    dense = smoke_config("moe=False", dataset="stdlib_text/small", data_dir=data_dir,
                         num_train_steps=2, eval_every_steps=2, checkpoint_every_steps=2)
    dense.model.num_layers = 1
    trainer.run(dense, str(tmp_path / "dense"))
    moe = smoke_config(dataset="stdlib_text/small", data_dir=data_dir, num_train_steps=1,
                       eval_every_steps=1, checkpoint_every_steps=1,
                       init_from=str(tmp_path / "dense"), upcycle=True)
    moe.model.num_layers = 1
    moe.moe.update(d_ff=dense.model.d_ff, dispatch="dense")
    trainer.run(moe, str(tmp_path / "moe"))

    def eval_loss(workdir, step):
        [row] = [r for r in read_metrics(workdir) if r["step"] == step and "eval_loss" in r]
        return row["eval_loss"]

    np.testing.assert_allclose(eval_loss(str(tmp_path / "moe"), 0),
                               eval_loss(str(tmp_path / "dense"), 2), rtol=1e-5)
    with pytest.raises(ValueError, match="config.upcycle needs config.init_from"):
        trainer.run(smoke_config(upcycle=True), str(tmp_path / "bad"))
