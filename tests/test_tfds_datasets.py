"""Any TFDS text dataset by name and text key: ``c4/en``, ``lm1b``, ``wikipedia/<dump>.<lang>``.

Each dataset here is prepared in the test the way ``tfds build <name> --file_format=array_record`` prepares
the real one (same names, configs, versions, features and file layout under ``data_dir``), from small local
raw files shaped like the real downloads (c4's ``*.json.gz``, lm1b's one-sentence-per-line shards, a
wikipedia dump's articles). The reference token streams are built from those raw files, not through TFDS.
"""

import gzip
import json
import os
import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds
import tokenizers
from etils import epath

from moejax import data

_WORDS = "the of and to in a is that for it as was with be by on not he i this are or his from at".split()
_WORDS += ["naïve", "café", "東京", "Zürich", "—", "2024", "3.14", "e-mail"]


def _sentence(rng: np.random.Generator) -> str:
    words = rng.choice(_WORDS, size=rng.integers(3, 12))
    return " ".join(words).capitalize() + "."


def _document(rng: np.random.Generator) -> str:
    def paragraph():
        return " ".join(_sentence(rng) for _ in range(rng.integers(1, 4)))

    paragraphs = (paragraph() for _ in range(rng.integers(1, 4)))
    return "\n".join(paragraphs)


class _FromRawFiles(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Reads ``manual_dir/<split>/*`` in name order; the subclasses say how a raw file holds documents."""

    code_path = epath.Path(__file__)
    MANUAL_DOWNLOAD_INSTRUCTIONS = "The raw files the test writes."
    FEATURES: dict[str, tfds.features.FeatureConnector] = {}

    def _info(self):
        # Stored in the order of the raw files, so that the test can rebuild the stream from them.
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict(self.FEATURES), disable_shuffling=True
        )

    def _split_generators(self, dl_manager):
        root = pathlib.Path(dl_manager.manual_dir)
        return {split.name: self._generate_examples(sorted(split.iterdir())) for split in root.iterdir()}

    def _generate_examples(self, files):
        for file in files:
            for i, example in enumerate(self.read(file)):
                yield f"{file.name}/{i}", example

    @staticmethod
    def read(file: pathlib.Path) -> list[dict]:
        raise NotImplementedError


class C4(_FromRawFiles, skip_registration=True):
    name = "c4"
    VERSION = tfds.core.Version("3.1.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="en")]
    FEATURES = {"text": tfds.features.Text(), "timestamp": tfds.features.Text(), "url": tfds.features.Text()}

    @staticmethod
    def read(file):
        with gzip.open(file, "rt", encoding="utf-8") as f:
            return [json.loads(line) for line in f]


class Lm1b(_FromRawFiles, skip_registration=True):
    name = "lm1b"
    VERSION = tfds.core.Version("1.1.0")
    FEATURES = {"text": tfds.features.Text()}

    @staticmethod
    def read(file):
        return [{"text": line} for line in file.read_text(encoding="utf-8").splitlines()]


class Wikipedia(_FromRawFiles, skip_registration=True):
    name = "wikipedia"
    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="20230601.en")]
    FEATURES = {"title": tfds.features.Text(), "text": tfds.features.Text()}

    @staticmethod
    def read(file):
        return [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines()]


def _write_raw_files(root: pathlib.Path, rng: np.random.Generator) -> dict[str, dict[str, list[str]]]:
    """Raw files of the three datasets; returns dataset -> split -> documents in file order."""
    docs: dict[str, dict[str, list[str]]] = {"c4/en": {}, "lm1b": {}, "wikipedia/20230601.en": {}}
    for split, num_files in (("train", 2), ("validation", 1)):
        for name in docs:
            docs[name][split] = []
        for shard in range(num_files):
            c4_dir, lm1b_dir, wiki_dir = (root / n / split for n in ("c4", "lm1b", "wikipedia"))
            for d in (c4_dir, lm1b_dir, wiki_dir):
                d.mkdir(parents=True, exist_ok=True)
            texts = [_document(rng) for _ in range(6)]
            rows = [{"text": t, "timestamp": "2019-04-25T12:57:54Z", "url": f"https://example.com/{i}"}
                    for i, t in enumerate(texts)]
            with gzip.open(c4_dir / f"c4-{split}.{shard:05d}-of-{num_files:05d}.json.gz", "wt") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
            docs["c4/en"][split] += texts
            sentences = [_sentence(rng) for _ in range(12)]
            (lm1b_dir / f"news.en-{shard + 1:05d}-of-00100").write_text("\n".join(sentences) + "\n")
            docs["lm1b"][split] += sentences
            articles = [{"title": f"Article {shard}.{i}", "text": _document(rng)} for i in range(4)]
            (wiki_dir / f"enwiki-{shard}.jsonl").write_text("".join(json.dumps(a) + "\n" for a in articles))
            docs["wikipedia/20230601.en"][split] += [a["text"] for a in articles]
    return docs


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """(data_dir, documents): the three datasets prepared under one data_dir as ``tfds build`` would."""
    raw, data_dir = tmp_path_factory.mktemp("raw"), str(tmp_path_factory.mktemp("tfds"))
    docs = _write_raw_files(raw, np.random.default_rng(0))
    for builder_cls, config, raw_name in ((C4, "en", "c4"), (Lm1b, None, "lm1b"),
                                          (Wikipedia, "20230601.en", "wikipedia")):
        builder = builder_cls(data_dir=data_dir, config=config, file_format="array_record")
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=raw / raw_name))
    return data_dir, docs


def _byte_stream(texts):
    return np.concatenate([data.encode(t, eos=True) for t in texts])


def _windows(iterator):
    return [np.concatenate([b["inputs"][0], b["targets"][0, -1:]]) for b in iterator]


def _rows(data_dir, name, **kwargs):
    args = {"split": "train", "seq_len": 16, "batch_size": 1, "process_index": 0, "process_count": 1,
            "data_dir": data_dir}
    return data.create_iterator(name, **(args | kwargs))


def test_the_datasets_have_the_layout_of_real_prepared_ones(prepared):
    data_dir, _ = prepared
    assert sorted(os.listdir(os.path.join(data_dir, "c4", "en", "3.1.0"))) == [
        "c4-train.array_record-00000-of-00001",
        "c4-validation.array_record-00000-of-00001",
        "dataset_info.json",
        "features.json",
    ]
    assert os.path.exists(os.path.join(data_dir, "lm1b", "1.1.0", "lm1b-train.array_record-00000-of-00001"))
    assert os.path.exists(os.path.join(data_dir, "wikipedia", "20230601.en", "1.0.0", "dataset_info.json"))
    assert {"c4/en", "lm1b", "wikipedia/20230601.en"} <= set(data.available_datasets(data_dir))


@pytest.mark.parametrize("name", ["c4/en", "lm1b", "wikipedia/20230601.en"])
def test_a_tfds_text_dataset_is_read_by_name_and_text_key(prepared, name):
    data_dir, docs = prepared
    stream = _byte_stream(docs[name]["validation"])
    windows = _windows(_rows(data_dir, name, split="validation", shuffle=False, num_epochs=1))
    assert len(windows) == (len(stream) - 1) // 16
    for w, window in enumerate(windows):
        np.testing.assert_array_equal(window, stream[w * 16 : w * 16 + 17])


def test_a_versioned_name_reads_that_version(prepared):
    data_dir, docs = prepared
    window = _windows(_rows(data_dir, "c4/en:3.1.0", shuffle=False, num_epochs=1))[0]
    np.testing.assert_array_equal(window, _byte_stream(docs["c4/en"]["train"])[:17])
    with pytest.raises(ValueError, match="unknown dataset 'c4/en:3.0.0'"):
        _rows(data_dir, "c4/en:3.0.0")


def test_another_text_key_reads_that_feature(prepared):
    data_dir, _ = prepared
    rows = _rows(data_dir, "wikipedia/20230601.en", text_key="title", shuffle=False, num_epochs=1)
    window = _windows(rows)[0]
    np.testing.assert_array_equal(window, _byte_stream(["Article 0.0", "Article 0.1"])[:17])
    with pytest.raises(ValueError, match=r"text_key 'body' is not a feature of 'c4/en'; "
                                         r"features: \['text', 'timestamp', 'url'\]"):
        _rows(data_dir, "c4/en", text_key="body")


def test_a_tfds_dataset_with_a_tokenizer_json_and_process_shards(prepared, tmp_path):
    data_dir, docs = prepared
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.train_from_iterator(docs["c4/en"]["train"], tokenizers.trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    hf = data.get_tokenizer(f"hf:{tmp_path / 'tokenizer.json'}")
    eos = tok.token_to_id("<|endoftext|>")
    stream = np.concatenate([[*tok.encode(t).ids, eos] for t in docs["c4/en"]["train"]])
    windows = _windows(_rows(data_dir, "c4/en", shuffle=False, num_epochs=1, tokenizer=hf))
    assert len(windows) == (len(stream) - 1) // 16
    for w, window in enumerate(windows):
        np.testing.assert_array_equal(window, stream[w * 16 : w * 16 + 17])

    whole = next(_rows(data_dir, "c4/en", batch_size=4, tokenizer=hf))["inputs"]
    shards = [next(_rows(data_dir, "c4/en", batch_size=2, process_index=p, process_count=2, tokenizer=hf))
              for p in (0, 1)]
    np.testing.assert_array_equal(np.concatenate([s["inputs"] for s in shards]), whole)
