"""grain pipeline: packing, determinism, per-process shards, resumable state, loss masks, subword
tokenizers and their cached token streams, bad input."""

import itertools
import json
import os
import re
import threading
import time

import jax
import numpy as np
import pytest
import sentencepiece
import tensorflow_datasets as tfds
from etils import epath
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moejax import data
from moejax.data import pipeline, train_tokenizer

SMALL = "stdlib_text/small"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def sp_model(data_dir):
    """A SentencePiece model trained on the small corpus' training split (384 ids)."""
    return train_tokenizer.train_sentencepiece(
        train_tokenizer.dataset_texts(SMALL, data_dir=data_dir), vocab_size=384, num_threads=1
    )


@pytest.fixture(scope="module")
def sp(sp_model):
    return data.SentencePieceTokenizer(sp_model)


def _iterator(data_dir, name=SMALL, **kwargs):
    args = {"split": "train", "seq_len": 32, "batch_size": 4, "process_index": 0, "process_count": 1}
    return data.create_iterator(name, data_dir=data_dir, **(args | kwargs))


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def _token_stream(data_dir, split):
    """doc_0 EOS doc_1 EOS ... from the stored records: byte b -> b + 3, EOS = 2."""
    source = data.load_builder(SMALL, data_dir).as_data_source(split=split)
    parts = []
    for i in range(len(source)):
        parts += [np.frombuffer(source[i]["text"], np.uint8).astype(np.int32) + 3, [2]]
    return np.concatenate(parts)


# ------------------------------------------------------------------------------------------- packing


def test_text_rows_are_full_with_targets_shifted_by_one(data_dir):
    batch = next(_iterator(data_dir, seq_len=32, batch_size=4))
    assert batch["inputs"].shape == batch["targets"].shape == batch["weights"].shape == (4, 32)
    assert batch["inputs"].dtype == batch["targets"].dtype == np.int32
    assert batch["weights"].dtype == np.float32
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    assert (batch["inputs"] != data.PAD_ID).all()
    np.testing.assert_array_equal(batch["weights"], 1.0)


def test_unshuffled_rows_tile_the_token_stream(data_dir):
    seq_len = 256
    stream = _token_stream(data_dir, "validation")
    rows = _iterator(
        data_dir, split="validation", seq_len=seq_len, batch_size=1, shuffle=False, num_epochs=1
    )
    windows = [np.concatenate([b["inputs"][0], b["targets"][0, -1:]]) for b in rows]
    assert len(windows) == (len(stream) - 1) // seq_len
    for w, window in enumerate(windows):
        np.testing.assert_array_equal(window, stream[w * seq_len : w * seq_len + seq_len + 1])


def test_an_epoch_visits_every_window_once(data_dir):
    def rows(shuffle):
        it = _iterator(
            data_dir, split="validation", seq_len=2048, batch_size=1, shuffle=shuffle, num_epochs=1
        )
        return [b["inputs"][0].tobytes() for b in it]

    ordered, shuffled = rows(False), rows(True)
    assert shuffled != ordered
    assert sorted(shuffled) == sorted(ordered)


# ------------------------------------------------------------------------------------------- determinism


def test_same_seed_gives_the_same_batches(data_dir):
    _assert_same_batches(_take(_iterator(data_dir, seed=7), 3), _take(_iterator(data_dir, seed=7), 3))


def test_different_seeds_give_different_batches(data_dir):
    a, b = next(_iterator(data_dir, seed=7)), next(_iterator(data_dir, seed=8))
    assert not np.array_equal(a["inputs"], b["inputs"])


def test_process_shards_are_disjoint_and_make_up_the_global_batch(data_dir):
    whole = _take(_iterator(data_dir, batch_size=4), 3)
    shards = [
        _take(_iterator(data_dir, batch_size=2, process_index=p, process_count=2), 3) for p in (0, 1)
    ]
    for step in range(3):
        rows_0, rows_1 = shards[0][step]["inputs"], shards[1][step]["inputs"]
        assert not {r.tobytes() for r in rows_0} & {r.tobytes() for r in rows_1}
        np.testing.assert_array_equal(np.concatenate([rows_0, rows_1]), whole[step]["inputs"])


def test_finite_epochs_end_after_the_last_full_global_batch(data_dir):
    num_rows = (len(_token_stream(data_dir, "validation")) - 1) // 512
    shards = [
        list(_iterator(data_dir, split="validation", seq_len=512, batch_size=3, num_epochs=2,
                       process_index=p, process_count=2))
        for p in (0, 1)
    ]
    assert len(shards[0]) == len(shards[1]) == 2 * num_rows // 6


# ------------------------------------------------------------------------------------------- state


def test_restored_state_continues_with_the_same_batches(data_dir):
    iterator = _iterator(data_dir, seed=3)
    _take(iterator, 2)
    state = iterator.get_state()
    expected = _take(iterator, 3)
    resumed = _iterator(data_dir, seed=3)
    resumed.set_state(state)
    _assert_same_batches(_take(resumed, 3), expected)


def test_state_is_json_bytes(data_dir):
    state = _iterator(data_dir).get_state()
    assert isinstance(state, bytes)
    assert json.loads(state)["pipeline"]["global_batch_size"] == 4


def test_state_restores_onto_another_process_split_with_the_same_global_batch(data_dir):
    single = _iterator(data_dir, batch_size=4)
    _take(single, 2)
    state = single.get_state()
    expected_rows = next(single)["inputs"][2:]
    second_process = _iterator(data_dir, batch_size=2, process_index=1, process_count=2)
    second_process.set_state(state)
    np.testing.assert_array_equal(next(second_process)["inputs"], expected_rows)


def test_state_from_a_different_pipeline_is_rejected(data_dir):
    state = _iterator(data_dir, seed=1).get_state()
    with pytest.raises(ValueError, match="seed: saved 1, now 2"):
        _iterator(data_dir, seed=2).set_state(state)
    with pytest.raises(ValueError, match="not a DataIterator state"):
        _iterator(data_dir).set_state(b"garbage")


# ------------------------------------------------------------------------------------------- instruct


def test_instruction_row_weights_cover_exactly_the_answer_and_eos():
    row = data.instruct_row("Hi?", "ok", seq_len=10)
    # tokens: BOS H i ? o k EOS PAD PAD PAD PAD; target j is token j + 1.
    np.testing.assert_array_equal(row["inputs"], [1, 75, 108, 66, 114, 110, 2, 0, 0, 0])
    np.testing.assert_array_equal(row["targets"], [75, 108, 66, 114, 110, 2, 0, 0, 0, 0])
    np.testing.assert_array_equal(row["weights"], [0, 0, 0, 1, 1, 1, 0, 0, 0, 0])


def test_instruct_batches_weight_only_answer_tokens(data_dir):
    source = data.load_builder("instruct_synth", data_dir).as_data_source(split="eval_min")
    batch = next(_iterator(data_dir, "instruct_synth", split="eval_min", seq_len=127, shuffle=False))
    for i in range(4):
        prompt, answer = source[i]["prompt"].decode(), source[i]["answer"].decode()
        weighted = batch["targets"][i][batch["weights"][i] > 0]
        assert data.decode(weighted) == answer
        assert weighted[-1] == data.EOS_ID
        assert len(weighted) == len(answer.encode()) + 1
        assert data.decode(batch["inputs"][i]).startswith(prompt + answer)
        assert batch["inputs"][i][0] == data.BOS_ID


def test_instruct_train_batches_hold_no_held_out_prompts(data_dir):
    synth = data.instruct_synth
    held_out = [
        re.compile("^" + re.sub(r"\\\{\w+\\\}", ".+", re.escape(t)) + "$")
        for f in synth.HELD_OUT_FAMILIES
        for t in synth.templates(f)
    ]
    for family in synth.HELD_OUT_FAMILIES:  # the matcher recognises held-out prompts
        prompt = synth.make_examples(family, 1, seed=0)[0][0].split(synth.ANSWER_MARKER)[0]
        assert any(p.match(prompt) for p in held_out)
    for batch in itertools.islice(_iterator(data_dir, "instruct_synth", seq_len=127, batch_size=64), 10):
        for row in batch["inputs"]:
            instruction = data.decode(row).split(synth.ANSWER_MARKER)[0]
            assert not any(p.match(instruction) for p in held_out), instruction


# ------------------------------------------------------------------------------------------- tokenizers


def test_the_default_tokenizer_gives_the_byte_batches(data_dir):
    default = _take(_iterator(data_dir, seed=5), 2)
    for tokenizer in ("byte", data.ByteTokenizer()):
        _assert_same_batches(_take(_iterator(data_dir, seed=5, tokenizer=tokenizer), 2), default)
    assert json.loads(_iterator(data_dir).get_state())["pipeline"]["tokenizer"] == "byte"


def _sp_stream(sp_model, data_dir, split):
    """doc_0 EOS doc_1 EOS ... encoded by the sentencepiece library itself."""
    reference = sentencepiece.SentencePieceProcessor(model_proto=sp_model)
    source = data.load_builder(SMALL, data_dir).as_data_source(split=split)
    parts = [[*reference.encode(source[i]["text"].decode()), reference.eos_id()] for i in range(len(source))]
    return np.concatenate(parts)


def test_subword_rows_tile_the_encoded_token_stream(data_dir, sp, sp_model):
    seq_len = 256
    stream = _sp_stream(sp_model, data_dir, "validation")
    rows = _iterator(data_dir, split="validation", seq_len=seq_len, batch_size=1, shuffle=False,
                     num_epochs=1, tokenizer=sp)
    windows = [np.concatenate([b["inputs"][0], b["targets"][0, -1:]]) for b in rows]
    assert len(windows) == (len(stream) - 1) // seq_len
    assert len(stream) < 0.8 * len(_token_stream(data_dir, "validation"))  # fewer tokens than bytes
    for w, window in enumerate(windows):
        assert window.dtype == np.int32
        np.testing.assert_array_equal(window, stream[w * seq_len : w * seq_len + seq_len + 1])


def test_subword_process_shards_are_disjoint_and_make_up_the_global_batch(data_dir, sp):
    whole = _take(_iterator(data_dir, batch_size=4, tokenizer=sp), 2)
    shards = [_take(_iterator(data_dir, batch_size=2, process_index=p, process_count=2, tokenizer=sp), 2)
              for p in (0, 1)]
    for step in range(2):
        rows_0, rows_1 = shards[0][step]["inputs"], shards[1][step]["inputs"]
        assert not {r.tobytes() for r in rows_0} & {r.tobytes() for r in rows_1}
        np.testing.assert_array_equal(np.concatenate([rows_0, rows_1]), whole[step]["inputs"])
        assert whole[step]["inputs"].max() < sp.vocab_size


def test_the_token_stream_is_tokenized_once_into_the_cache_and_reused(data_dir, sp, tmp_path, monkeypatch):
    cache_dir = str(tmp_path / "cache")
    monkeypatch.setattr(pipeline, "_token_stream_memo", {})
    builder = data.load_builder(SMALL, data_dir)
    streams = [None, None]

    def tokenize(i):
        streams[i] = data.token_stream(builder, "validation", "text", sp, cache_dir)

    threads = [threading.Thread(target=tokenize, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (entry,) = [e for e in os.listdir(cache_dir) if not e.startswith(".")]
    assert entry.startswith("stdlib_text_small_1.0.0-validation-text-" + sp.name)
    info = json.loads((tmp_path / "cache" / entry / "info.json").read_text())
    assert info["dtype"] == "uint16" and info["tokenizer"] == sp.name
    assert info["num_tokens"] == len(streams[0])
    assert info["num_documents"] == builder.info.splits["validation"].num_examples
    np.testing.assert_array_equal(streams[0], streams[1])
    # A later process reads the file: the same tokens, and nothing is tokenized again.
    monkeypatch.setattr(pipeline, "_token_stream_memo", {})
    mtime = os.path.getmtime(tmp_path / "cache" / entry / "tokens.bin")
    monkeypatch.setattr(sp, "encode_batch", None)  # tokenizing again would fail
    np.testing.assert_array_equal(data.token_stream(builder, "validation", "text", sp, cache_dir), streams[0])
    assert os.path.getmtime(tmp_path / "cache" / entry / "tokens.bin") == mtime


def test_subword_streams_are_cached_under_the_data_dir_by_default(data_dir, sp):
    _iterator(data_dir, split="validation", tokenizer=sp)
    entries = os.listdir(os.path.join(data_dir, data.pipeline.TOKEN_CACHE_SUBDIR))
    assert any(sp.name in e for e in entries)
    assert data.default_cache_dir("gs://bucket/tfds") == os.path.expanduser("~/.cache/moejax/token_streams")


def test_state_saved_with_another_tokenizer_is_rejected(data_dir, sp):
    state = _iterator(data_dir).get_state()
    with pytest.raises(ValueError, match=f"tokenizer: saved 'byte', now '{sp.name}'"):
        _iterator(data_dir, tokenizer=sp).set_state(state)


def test_a_state_saved_before_tokenizers_restores_as_bytes(data_dir):
    iterator = _iterator(data_dir, seed=3)
    next(iterator)
    state = json.loads(iterator.get_state())
    del state["pipeline"]["tokenizer"]
    expected = next(iterator)
    resumed = _iterator(data_dir, seed=3)
    resumed.set_state(json.dumps(state).encode())
    _assert_same_batches([next(resumed)], [expected])


def test_subword_instruction_rows_weight_the_answer_and_match_generation_prompts(data_dir, sp):
    source = data.load_builder("instruct_synth", data_dir).as_data_source(split="eval_min")
    batch = next(_iterator(data_dir, "instruct_synth", split="eval_min", seq_len=127, shuffle=False,
                           tokenizer=sp))
    for i in range(4):
        prompt, answer = source[i]["prompt"].decode(), source[i]["answer"].decode()
        inputs, weighted = batch["inputs"][i], batch["targets"][i][batch["weights"][i] > 0]
        np.testing.assert_array_equal(weighted, sp.encode(answer, eos=True))
        prompt_ids = sp.encode(prompt, bos=True)  # what generation feeds the model
        np.testing.assert_array_equal(inputs[: len(prompt_ids)], prompt_ids)
        length = len(prompt_ids) + len(weighted)
        assert (inputs[length:] == sp.pad_id).all()
        assert sp.decode(inputs) == prompt + answer


def test_instruct_synth_room_is_counted_in_the_tokenizers_tokens(data_dir, sp):
    with pytest.raises(ValueError, match=r"seq_len must be at least \d+ for instruct_synth with tokenizer "
                                         r"'sentencepiece:<bytes>' \(its longest example is \d+ tokens\), "
                                         r"got 16") as e:
        _iterator(data_dir, "instruct_synth", split="eval_add", seq_len=16, tokenizer=sp)
    needed = int(re.search(r"at least (\d+)", str(e.value)).group(1))
    assert 16 < needed < 127  # fewer subword tokens than bytes
    _iterator(data_dir, "instruct_synth", split="eval_add", seq_len=needed, tokenizer=sp)


# ------------------------------------------------------------------------------------------- datasets


class TinyLines(tfds.core.GeneratorBasedBuilder):
    """A dataset some other project prepared, with its text under "sentence"."""

    VERSION = tfds.core.Version("2.0.0")
    code_path = epath.Path(__file__)

    def _info(self):
        features = tfds.features.FeaturesDict({"sentence": tfds.features.Text()})
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(50):
            yield i, {"sentence": f"line number {i}"}


def test_a_prepared_tfds_dataset_is_read_by_name_with_its_text_key(tmp_path):
    TinyLines(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    assert "tiny_lines" in data.available_datasets(str(tmp_path))
    rows = _iterator(
        str(tmp_path), "tiny_lines", text_key="sentence", seq_len=16, shuffle=False, num_epochs=1
    )
    source = data.load_builder("tiny_lines", str(tmp_path)).as_data_source(split="train")
    stream = np.concatenate([np.frombuffer(source[i]["sentence"] + b"\xff", np.uint8) + 3 for i in (0, 1)])
    stream[stream == 255 + 3] = data.EOS_ID
    np.testing.assert_array_equal(next(rows)["inputs"][0], stream[:16])
    expected = r"text_key 'text' is not a feature of 'tiny_lines'; features: \['sentence'\]"
    with pytest.raises(ValueError, match=expected):
        _iterator(str(tmp_path), "tiny_lines")


def test_make_global_batch_shards_rows_over_the_mesh(data_dir):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, P("data"))
    local = next(_iterator(data_dir, batch_size=8))
    global_batch = data.make_global_batch(local, sharding)
    for key, value in local.items():
        assert global_batch[key].sharding == sharding
        np.testing.assert_array_equal(np.asarray(global_batch[key]), value)


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("argument", ["seq_len", "batch_size"])
@pytest.mark.parametrize("value", [0, -1])
def test_non_positive_sizes_raise_naming_the_argument(data_dir, argument, value):
    with pytest.raises(ValueError, match=f"{argument} must be a positive integer, got {value}"):
        _iterator(data_dir, **{argument: value})


def test_unknown_split_raises_listing_the_splits(data_dir):
    with pytest.raises(ValueError, match=r"unknown split 'test' of 'stdlib_text/small'; expected one of "
                                         r"\['train', 'validation'\]"):
        _iterator(data_dir, split="test")


def test_unknown_dataset_raises_listing_the_available_ones(data_dir):
    expected = "unknown dataset 'lm1b'; available: digits_images, instruct_synth, stdlib_text, stdlib_text/small,"
    with pytest.raises(ValueError, match=expected) as e:
        _iterator(data_dir, "lm1b")
    assert "any TFDS dataset prepared" in str(e.value)


def test_instruct_synth_needs_room_for_its_longest_example(data_dir):
    with pytest.raises(ValueError, match="seq_len must be at least 127 for instruct_synth"):
        _iterator(data_dir, "instruct_synth", seq_len=64)


def test_process_index_out_of_range_raises(data_dir):
    with pytest.raises(ValueError, match=r"process_index must be in \[0, 2\), got 2"):
        _iterator(data_dir, process_index=2, process_count=2)


# ------------------------------------------------------------------------------------------- streamed


def _documents(data_dir, split):
    """The split's texts (bytes) in stored order."""
    source = data.load_builder(SMALL, data_dir).as_data_source(split=split)
    return [bytes(source[i]["text"]) for i in range(len(source))]


def _byte_ids(text):
    """Byte ids with the document's EOS: byte b -> b + 3, EOS = 2."""
    return np.concatenate([np.frombuffer(text, np.uint8).astype(np.int32) + 3, [2]])


def _windows_of(batches):
    """Each row's ``seq_len + 1`` tokens, after checking that targets are inputs shifted by one."""
    windows = []
    for batch in batches:
        assert batch["inputs"].dtype == batch["targets"].dtype == np.int32
        assert batch["weights"].dtype == np.float32
        np.testing.assert_array_equal(batch["weights"], 1.0)
        np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
        windows += [np.concatenate([i, t[-1:]]) for i, t in zip(batch["inputs"], batch["targets"])]
    return windows


def _streamed(data_dir, **kwargs):
    return _iterator(data_dir, stream=True, **kwargs)


@pytest.mark.parametrize("tokenizer", ["byte", "sentencepiece"])
@pytest.mark.parametrize("process_index, process_count", [(0, 1), (1, 3), (2, 3)])
def test_streamed_rows_are_windows_of_the_process_documents(data_dir, sp, sp_model, tokenizer,
                                                            process_index, process_count,
                                                            monkeypatch):
    seq_len, batch_size = 64, 4
    monkeypatch.setattr(pipeline, "STREAM_BLOCK_DOCS", 2)  # batches span blocks
    if tokenizer == "byte":
        encode, kwargs = _byte_ids, {}
    else:
        reference = sentencepiece.SentencePieceProcessor(model_proto=sp_model)

        def encode(text):
            return np.array([*reference.encode(text.decode()), reference.eos_id()], np.int32)

        kwargs = {"tokenizer": sp}
    texts = _documents(data_dir, "train")[process_index::process_count]  # unshuffled: p, p + n, ...
    stream = np.concatenate([encode(t) for t in texts])
    batches = list(_streamed(data_dir, seq_len=seq_len, batch_size=batch_size, shuffle=False,
                             num_epochs=1, process_index=process_index,
                             process_count=process_count, **kwargs))
    # The last partial window and partial batch are dropped.
    assert len(batches) == (len(stream) - 1) // seq_len // batch_size
    windows = _windows_of(batches)
    for w, window in enumerate(windows):
        np.testing.assert_array_equal(window, stream[w * seq_len : w * seq_len + seq_len + 1])


def test_a_streamed_shuffled_epoch_over_three_processes_reads_every_document_once(data_dir):
    seq_len, process_count = 32, 3
    documents = _documents(data_dir, "train")
    remaining, tails, orders = list(documents), [], []
    for p in range(process_count):
        windows = _windows_of(_streamed(data_dir, seq_len=seq_len, batch_size=1, seed=4,
                                        num_epochs=1, process_index=p, process_count=process_count))
        stream = np.concatenate([windows[0]] + [w[1:] for w in windows[1:]])
        # Token t is byte t - 3; EOS (2) becomes 0xFF, which UTF-8 text never holds.
        *complete, tail = (stream - 3).astype(np.uint8).tobytes().split(b"\xff")
        for text in complete:
            remaining.remove(text)  # fails on a document read twice or not in the split
        orders.append(complete)
        tails.append(tail)
    # What is left: each process's last document, cut short by the dropped partial window (fewer
    # than seq_len tokens), and nothing else.
    assert len(remaining) <= process_count
    for tail in tails:
        assert any(text.startswith(tail) for text in remaining)
    unseen = sum(len(text) + 1 for text in remaining) - sum(len(tail) for tail in tails)
    assert 0 <= unseen < process_count * seq_len
    assert orders != [documents[p::process_count][: len(o)] for p, o in enumerate(orders)]


@pytest.mark.parametrize("tokenizer", ["byte", "sentencepiece"])
def test_a_restored_streamed_state_continues_with_the_same_batches(data_dir, sp, tokenizer,
                                                                  monkeypatch):
    monkeypatch.setattr(pipeline, "STREAM_BLOCK_DOCS", 3)
    kwargs = {"tokenizer": sp} if tokenizer == "sentencepiece" else {}
    iterator = _streamed(data_dir, seed=3, process_index=1, process_count=2, **kwargs)
    _take(iterator, 3)
    state = iterator.get_state()
    assert json.loads(state)["position"]["offset"] > 0  # mid-document
    expected = _take(iterator, 4)
    resumed = _streamed(data_dir, seed=3, process_index=1, process_count=2, **kwargs)
    resumed.set_state(state)
    _assert_same_batches(_take(resumed, 4), expected)


def test_streamed_states_restore_anywhere_across_an_epoch_boundary(data_dir):
    def iterator():
        return _streamed(data_dir, split="validation", seq_len=256, batch_size=4, seed=5,
                         num_epochs=2, process_index=0, process_count=2)

    uninterrupted = iterator()
    states, batches = [uninterrupted.get_state()], []
    for batch in uninterrupted:
        batches.append(batch)
        states.append(uninterrupted.get_state())
    positions = [json.loads(s)["position"] for s in states]
    docs_per_epoch = len(range(0, len(_documents(data_dir, "validation")), 2))
    crossing = next(k for k, p in enumerate(positions) if p["document"] >= docs_per_epoch)
    assert 0 < crossing < len(batches)
    assert any(p["offset"] > 0 for p in positions)
    resumed = iterator()
    for k in sorted({1, crossing - 2, crossing - 1, crossing, len(batches) // 2, len(batches) - 1}):
        resumed.set_state(states[k])  # the same iterator, moved back and forth
        _assert_same_batches(_take(resumed, min(3, len(batches) - k)), batches[k : k + 3])
    resumed.set_state(states[-1])
    with pytest.raises(StopIteration):
        next(resumed)
    fresh = iterator()
    fresh.set_state(states[crossing - 1])
    _assert_same_batches(list(fresh), batches[crossing - 1 :])


class _CountingSource:
    """A data source that records the indices read."""

    def __init__(self, source):
        self.source, self.read = source, []

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        self.read.append(index)
        return self.source[index]

    def __getitems__(self, indices):
        self.read += list(indices)
        return self.source.__getitems__(indices)


def test_streaming_reads_only_the_documents_it_packs_and_writes_no_cache(data_dir, sp, tmp_path,
                                                                         monkeypatch):
    block = 2
    monkeypatch.setattr(pipeline, "STREAM_BLOCK_DOCS", block)
    sources = []
    load_builder = pipeline.load_builder

    def counting_builder(name, data_dir=None):
        builder = load_builder(name, data_dir)
        as_data_source = builder.as_data_source

        def counting(**kwargs):
            sources.append(_CountingSource(as_data_source(**kwargs)))
            return sources[-1]

        monkeypatch.setattr(builder, "as_data_source", counting)
        return builder

    def whole_split(*args, **kwargs):
        raise AssertionError("the whole split was read")

    monkeypatch.setattr(pipeline, "load_builder", counting_builder)
    monkeypatch.setattr(pipeline, "_doc_lengths", whole_split)
    monkeypatch.setattr(pipeline, "token_stream", whole_split)
    # Unshuffled, the first batch (4 * 32 + 1 tokens) needs the documents up to `needed`.
    lengths = np.cumsum([len(text) + 1 for text in _documents(data_dir, "train")])
    needed = int(np.searchsorted(lengths, 4 * 32 + 1)) + 1
    bound = (-(-needed // block) + 1) * block  # those documents' blocks and one block read ahead
    assert bound < len(lengths) // 2
    cache_dir = tmp_path / "cache"
    for tokenizer in ("byte", sp):
        iterator = _streamed(data_dir, shuffle=False, tokenizer=tokenizer, cache_dir=str(cache_dir))
        assert sources[-1].read == []  # creating the iterator reads nothing
        next(iterator)
        assert len(sources[-1].read) <= bound and set(sources[-1].read) <= set(range(bound))
        for _ in range(100):  # the block after the batch's is read ahead, in the background
            if len(sources[-1].read) == bound:
                break
            time.sleep(0.05)
        assert sources[-1].read == list(range(bound))
    assert not cache_dir.exists() or not os.listdir(cache_dir)


def test_a_streamed_state_restores_only_onto_the_same_process_split_and_mode(data_dir):
    state = _streamed(data_dir, process_index=0, process_count=2).get_state()
    assert json.loads(state)["pipeline"]["stream"] is True
    with pytest.raises(ValueError, match="process_count: saved 2, now 3"):
        _streamed(data_dir, batch_size=2, process_index=0, process_count=3).set_state(state)
    with pytest.raises(ValueError, match="process_index: saved 0, now 1"):
        _streamed(data_dir, process_index=1, process_count=2).set_state(state)
    with pytest.raises(ValueError, match=r"saved by the streamed pipeline \(stream=True\), not the "
                                         r"indexed one"):
        _iterator(data_dir, process_index=0, process_count=2).set_state(state)
    indexed = _iterator(data_dir, process_index=0, process_count=2).get_state()
    with pytest.raises(ValueError, match=r"saved by the indexed pipeline \(stream=False\), not the "
                                         r"streamed one"):
        _streamed(data_dir, process_index=0, process_count=2).set_state(indexed)
    with pytest.raises(ValueError, match="not a DataIterator state"):
        _streamed(data_dir).set_state(b"garbage")


def test_streaming_instruct_synth_is_refused_naming_stream(data_dir):
    with pytest.raises(ValueError, match=r"stream=True packs text documents; 'instruct_synth' is not"):
        _streamed(data_dir, name="instruct_synth", seq_len=127)
