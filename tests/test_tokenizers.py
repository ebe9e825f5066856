"""Tokenizers from a spec string: bytes, SentencePiece models (trained here), Hugging Face tokenizer.json.

The SentencePiece and tokenizer.json files are built in the tests from a small corpus, offline.
"""

import io
import pathlib
import sysconfig

import numpy as np
import pytest
import sentencepiece
import tokenizers
from hypothesis import given
from hypothesis import strategies as st

import fake_gcs
from moejax import data
from moejax.data import train_tokenizer

_STDLIB = pathlib.Path(sysconfig.get_paths()["stdlib"])
CORPUS = [(_STDLIB / name).read_text() for name in ("bisect.py", "colorsys.py", "keyword.py", "this.py")]
CORPUS.append("Zürich, 東京, naïve café — ünïcödé text in a small corpus.\n" * 3)
SAMPLES = ["", "def f(x):\n    return x + 1\n", "  two  spaces\t\ttabs\n\n", "é漢字🙂 x", "\x00\x7f"]


@pytest.fixture(scope="module")
def sp_model():
    return train_tokenizer.train_sentencepiece(CORPUS, vocab_size=400, num_threads=1)


@pytest.fixture(scope="module")
def sp(sp_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("sp") / "corpus.model"
    path.write_bytes(sp_model)
    return data.get_tokenizer(f"sentencepiece:{path}")


def _byte_level_bpe(specials, vocab_size=300):
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="module")
def hf_path(tmp_path_factory):
    """A GPT-2-style tokenizer.json: byte-level BPE, one special token for both ends, no padding token."""
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    _byte_level_bpe(["<|endoftext|>"]).save(str(path))
    return path


@pytest.fixture(scope="module")
def hf(hf_path):
    return data.get_tokenizer(f"hf:{hf_path}")


# ------------------------------------------------------------------------------------------------ bytes


def test_byte_is_the_default_with_the_byte_ids():
    tok = data.get_tokenizer("byte")
    assert data.get_tokenizer(None) is tok
    assert (tok.name, tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == ("byte", 384, 0, 1, 2)
    framed = tok.encode("Aé", bos=True, eos=True)
    np.testing.assert_array_equal(framed, data.encode("Aé", bos=True, eos=True))
    np.testing.assert_array_equal(tok.encode("Aé", bos=True, eos=True), [1, 68, 0xC3 + 3, 0xA9 + 3, 2])
    assert tok.decode([1, 68, 0, 2, 383]) == "A"


def test_a_tokenizer_object_passes_through(sp):
    assert data.get_tokenizer(sp) is sp


def test_padded_vocab_size_is_the_next_multiple_of_128():
    assert [data.padded_vocab_size(n) for n in (1, 128, 129, 32000, 32001)] == [128, 128, 256, 32000, 32128]


# ---------------------------------------------------------------------------------------- sentencepiece


def test_trained_sentencepiece_has_the_byte_special_ids_and_a_padded_vocab(sp):
    assert (sp.pad_id, sp.bos_id, sp.eos_id) == (data.PAD_ID, data.BOS_ID, data.EOS_ID)
    assert sp.vocab_size == 512  # 400 pieces
    assert sp.name.startswith("sentencepiece-")


@given(st.text())
def test_sentencepiece_decode_inverts_encode(sp, text):
    ids = sp.encode(text)
    assert ids.dtype == np.int32
    assert sp.decode(ids) == text


def test_sentencepiece_ids_are_the_library_ids(sp, sp_model):
    reference = sentencepiece.SentencePieceProcessor(model_proto=sp_model)
    for text in SAMPLES + CORPUS[:2]:
        np.testing.assert_array_equal(sp.encode(text), reference.encode(text))
    assert len(sp.encode(CORPUS[0])) < 0.7 * len(CORPUS[0].encode())  # learned pieces, not bytes


def test_sentencepiece_frames_with_bos_eos_and_decode_skips_specials_and_padding(sp):
    ids = sp.encode("x = 1", bos=True, eos=True)
    assert ids[0] == sp.bos_id and ids[-1] == sp.eos_id
    noisy = np.concatenate([[sp.pad_id], ids, [sp.vocab_size - 1, sp.pad_id]])
    assert sp.decode(noisy) == "x = 1"


def test_sentencepiece_training_and_encoding_are_deterministic(sp, sp_model):
    again = train_tokenizer.train_sentencepiece(CORPUS, vocab_size=400, num_threads=1)
    assert again == sp_model
    assert data.SentencePieceTokenizer(again).name == sp.name
    np.testing.assert_array_equal(sp.encode(CORPUS[0]), sp.encode(CORPUS[0]))
    batch = sp.encode_batch(SAMPLES)
    for text, ids in zip(SAMPLES, batch):
        np.testing.assert_array_equal(ids, sp.encode(text))


def test_a_sentencepiece_model_without_padding_gets_a_fresh_pad_id():
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=128, model_type="unigram",
        minloglevel=2, num_threads=1, hard_vocab_limit=True,
    )  # the library's defaults: unk 0, bos 1, eos 2, no pad
    tok = data.SentencePieceTokenizer(model.getvalue())
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 128)
    assert tok.vocab_size == 256
    assert tok.decode(np.concatenate([tok.encode("colors", eos=True), [tok.pad_id]])) == "colors"


# ------------------------------------------------------------------------------------ tokenizer.json


@given(st.text())
def test_hf_byte_level_decode_inverts_encode(hf, text):
    assert hf.decode(hf.encode(text)) == text


def test_hf_ids_are_the_library_ids_without_added_specials(hf, hf_path):
    reference = tokenizers.Tokenizer.from_file(str(hf_path))
    for text in SAMPLES + CORPUS[:2]:
        np.testing.assert_array_equal(hf.encode(text), reference.encode(text).ids)


def test_hf_special_tokens_by_name_and_a_fresh_pad(hf, hf_path):
    end = tokenizers.Tokenizer.from_file(str(hf_path)).token_to_id("<|endoftext|>")
    assert hf.bos_id == hf.eos_id == end
    assert hf.pad_id == 300 and hf.vocab_size == 384
    assert hf.decode([hf.bos_id, *hf.encode("abc"), hf.eos_id, hf.pad_id, 383]) == "abc"


def test_hf_pad_bos_eos_tokens_are_found(tmp_path):
    path = tmp_path / "tokenizer.json"
    tok = _byte_level_bpe(["<pad>", "<s>", "</s>"], vocab_size=384)
    tok.save(str(path))
    loaded = data.get_tokenizer(f"hf:{path}")
    ids = [tok.token_to_id(t) for t in ("<pad>", "<s>", "</s>")]
    assert [loaded.pad_id, loaded.bos_id, loaded.eos_id] == ids
    assert loaded.vocab_size == 384


def test_the_name_is_a_fingerprint_of_the_file(hf_path, tmp_path, sp, sp_model):
    copy = tmp_path / "copy.json"
    copy.write_bytes(hf_path.read_bytes())
    assert data.get_tokenizer(f"hf:{copy}").name == data.get_tokenizer(f"hf:{hf_path}").name
    assert data.SentencePieceTokenizer(sp_model).name == sp.name
    assert len({sp.name, data.get_tokenizer(f"hf:{hf_path}").name, "byte"}) == 3


def test_tokenizer_files_are_read_from_gcs(tmp_path, sp_model, hf_path):
    with fake_gcs.install(tmp_path / "gcs"):
        from etils import epath

        epath.Path("gs://bucket/tok/sp.model").write_bytes(sp_model)
        epath.Path("gs://bucket/tok/tokenizer.json").write_bytes(hf_path.read_bytes())
        sp = data.get_tokenizer("sentencepiece:gs://bucket/tok/sp.model")
        hf = data.get_tokenizer("hf:gs://bucket/tok/tokenizer.json")
    assert sp.decode(sp.encode(CORPUS[0])) == CORPUS[0]
    assert hf.decode(hf.encode(CORPUS[0])) == CORPUS[0]


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "spec, message",
    [
        ("bpe:x.model", r"unknown tokenizer 'bpe:x.model'; expected 'byte', 'sentencepiece:<path"),
        ("sentencepiece:", r"tokenizer spec 'sentencepiece:' names no file"),
        ("hf:/nonexistent/tokenizer.json", r"tokenizer file '/nonexistent/tokenizer.json' .* does not exist"),
        (384, r"tokenizer must be a spec string or a Tokenizer, got int"),
    ],
)
def test_bad_specs_raise_naming_the_spec(spec, message):
    with pytest.raises(ValueError, match=message):
        data.get_tokenizer(spec)


def test_training_rejects_a_vocab_without_room_for_pieces():
    with pytest.raises(ValueError, match="vocab_size must be an integer >= 261, got 200"):
        train_tokenizer.train_sentencepiece(CORPUS, vocab_size=200)
    with pytest.raises(ValueError, match="vocab_size = 300 is too small for the characters of this corpus"):
        train_tokenizer.train_sentencepiece(CORPUS, vocab_size=300, num_threads=1)


def test_encode_rejects_non_text(sp, hf):
    for tok in (sp, hf):
        with pytest.raises(ValueError, match="text must be str or bytes, got list"):
            tok.encode([1, 2])


# ------------------------------------------------------------------------------------ the command line


def test_train_tokenizer_command_writes_a_model_that_loads(tmp_path, capsys):
    data_dir, output = str(tmp_path / "tfds"), str(tmp_path / "out" / "small.model")
    spec = train_tokenizer.main(
        ["--dataset=stdlib_text/small", f"--data_dir={data_dir}", "--vocab_size=384", f"--output={output}"]
    )
    assert spec == f"sentencepiece:{output}"
    assert capsys.readouterr().out.strip().endswith(spec)
    tok = data.get_tokenizer(spec)
    assert tok.vocab_size == 384
    source = data.load_builder("stdlib_text/small", data_dir).as_data_source(split="validation")
    text = source[0]["text"].decode()
    assert tok.decode(tok.encode(text)) == text
