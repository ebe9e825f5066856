"""Tokenizers: bytes (the default), SentencePiece models and Hugging Face ``tokenizer.json`` files.

One constructor from a config string, :func:`get_tokenizer`:

- ``"byte"``: three special ids, then the 256 byte values (below).
- ``"sentencepiece:<path to .model>"``: any SentencePiece model (``python -m moejax.data.train_tokenizer``
  trains one on a dataset here).
- ``"hf:<path to tokenizer.json>"``: any Hugging Face ``tokenizers`` file.

Paths may be local or remote (``gs://...``, read with ``etils.epath``). Every tokenizer has ``encode(text,
bos=, eos=)`` (int32 ids), ``decode(ids)`` (text; special and padding ids skipped), ``pad_id``, ``bos_id``,
``eos_id``, ``vocab_size`` and ``name``, a fingerprint of the vocabulary (``"byte"``,
``"sentencepiece-<sha256 of the model file>"``, ...) under which token streams are cached.

``vocab_size`` is the embedding size, padded to a multiple of 128: the embedding and logit matrices then
tile into 128-wide TPU lanes, and the vocab axis divides by every power-of-two tensor-parallel size up to
128. Ids beyond the tokenizer's own never occur in data; the model learns to give them no mass within the
first steps.

Special ids of a loaded tokenizer are its own where it has them (a SentencePiece model's ``pad_id`` /
``bos_id`` / ``eos_id``; in a ``tokenizer.json``, the first special token named like one of
``PAD_NAMES`` / ``BOS_NAMES`` / ``EOS_NAMES``); a missing one gets a fresh id after the tokenizer's
vocabulary, so every tokenizer can pad rows and separate documents.

Byte ids: ``PAD_ID = 0``, ``BOS_ID = 1``, ``EOS_ID = 2``, byte ``b`` -> ``b + 3`` (ids 3..258), ``VOCAB_SIZE =
384`` (3 x 128). Any text round-trips exactly (``decode(encode(s)) == s`` for every ``str``); ``decode``
replaces bytes that are not valid UTF-8 (a generated sequence can stop mid-character). A subword
tokenizer round-trips what its model can represent: a model trained here (byte fallback, no
normalization) every ``str``, a byte-level BPE ``tokenizer.json`` too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
from etils import epath

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
BYTE_OFFSET = 3
VOCAB_SIZE = 384
VOCAB_MULTIPLE = 128

# Spellings of special tokens in tokenizer.json files, most common first.
PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>", "<|finetune_right_pad_id|>")
BOS_NAMES = ("<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>", "<|endoftext|>", "[CLS]")
EOS_NAMES = ("</s>", "<eos>", "<|end_of_text|>", "<|endoftext|>", "[SEP]")


def padded_vocab_size(num_ids: int) -> int:
    """The smallest multiple of 128 that holds ``num_ids`` ids."""
    return -(-num_ids // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def _as_text(text: str | bytes) -> str:
    if isinstance(text, bytes):
        return text.decode("utf-8", errors="replace")
    if not isinstance(text, str):
        raise ValueError(f"text must be str or bytes, got {type(text).__name__}")
    return text


def _frame(ids, bos_id: int | None, eos_id: int | None) -> np.ndarray:
    head = [bos_id] if bos_id is not None else []
    tail = [eos_id] if eos_id is not None else []
    return np.asarray(head + list(ids) + tail, np.int32)


class Tokenizer:
    """Text <-> int32 ids; subclasses set the attributes and ``_encode`` / ``_decode``."""

    name: str
    spec: str
    vocab_size: int
    num_ids: int  # ids the tokenizer can produce (special ids included), before padding
    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, text: str | bytes, *, bos: bool = False, eos: bool = False) -> np.ndarray:
        """Token ids (int32 [n]) of ``text``, optionally framed by BOS / EOS."""
        ids = self._encode_batch([text])[0]
        if not (bos or eos):
            return ids
        return _frame(ids, self.bos_id if bos else None, self.eos_id if eos else None)

    def encode_batch(self, texts: Sequence[str | bytes]) -> list[np.ndarray]:
        """``[encode(t) for t in texts]`` (no BOS / EOS), in parallel where the library allows."""
        return self._encode_batch(list(texts))

    def decode(self, ids) -> str:
        """Text of ``ids``; special ids and ids beyond the tokenizer's vocabulary are skipped."""
        return self._decode(np.asarray(ids).reshape(-1).astype(np.int64))

    def _encode_batch(self, texts: list[str | bytes]) -> list[np.ndarray]:
        raise NotImplementedError

    def _decode(self, ids_N: np.ndarray) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, name={self.name!r}, vocab_size={self.vocab_size})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes: ``PAD_ID``, ``BOS_ID``, ``EOS_ID``, then byte ``b`` -> ``b + 3``."""

    name = spec = "byte"
    vocab_size = VOCAB_SIZE
    num_ids = BYTE_OFFSET + 256
    pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID

    def encode(self, text: str | bytes, *, bos: bool = False, eos: bool = False) -> np.ndarray:
        if isinstance(text, str):
            text = text.encode("utf-8")
        elif not isinstance(text, bytes):
            raise ValueError(f"text must be str or bytes, got {type(text).__name__}")
        ids = np.frombuffer(text, dtype=np.uint8).astype(np.int32) + BYTE_OFFSET
        if not (bos or eos):
            return ids
        parts = ([np.array([BOS_ID], np.int32)] if bos else []) + [ids]
        if eos:
            parts.append(np.array([EOS_ID], np.int32))
        return np.concatenate(parts)

    def _encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def _decode(self, ids_N):
        byte_ids = ids_N[(ids_N >= BYTE_OFFSET) & (ids_N < BYTE_OFFSET + 256)]
        return (byte_ids - BYTE_OFFSET).astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def _special_ids(own: dict[str, int | None], num_ids: int) -> tuple[dict[str, int], int]:
    """The tokenizer's own special ids, fresh ids from ``num_ids`` on for the missing ones."""
    ids, next_id = {}, num_ids
    for role in ("pad", "bos", "eos"):
        if own[role] is None:
            ids[role], next_id = next_id, next_id + 1
        else:
            ids[role] = own[role]
    return ids, next_id


def _read_bytes(path: str, field: str) -> bytes:
    if not path:
        raise ValueError(f"tokenizer spec {field!r} names no file: expected {field}<path>")
    file = epath.Path(path)
    if not file.exists():
        raise ValueError(f"tokenizer file {path!r} (from spec {field + path!r}) does not exist")
    return file.read_bytes()


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (``.model`` file contents)."""

    def __init__(self, model_proto: bytes, *, spec: str = "sentencepiece:<bytes>"):
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
        self.spec = spec
        self.name = "sentencepiece-" + hashlib.sha256(model_proto).hexdigest()[:16]
        self._num_pieces = self._sp.get_piece_size()
        own = {
            "pad": self._sp.pad_id(),
            "bos": self._sp.bos_id(),
            "eos": self._sp.eos_id(),
        }
        ids, num_ids = _special_ids({k: (v if v >= 0 else None) for k, v in own.items()}, self._num_pieces)
        self.pad_id, self.bos_id, self.eos_id = ids["pad"], ids["bos"], ids["eos"]
        self.num_ids = num_ids
        self.vocab_size = padded_vocab_size(num_ids)

    def _encode_batch(self, texts):
        encoded = self._sp.encode([_as_text(t) for t in texts])
        return [np.asarray(ids, np.int32) for ids in encoded]

    def _decode(self, ids_N):
        keep = (ids_N < self._num_pieces) & ~np.isin(ids_N, [self.pad_id, self.bos_id, self.eos_id])
        return self._sp.decode(ids_N[keep].tolist())


class HuggingFaceTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` model (``tokenizer.json`` contents)."""

    def __init__(self, tokenizer_json: bytes, *, spec: str = "hf:<bytes>"):
        import tokenizers

        self._tokenizer = tokenizers.Tokenizer.from_str(tokenizer_json.decode("utf-8"))
        self.spec = spec
        self.name = "hf-" + hashlib.sha256(tokenizer_json).hexdigest()[:16]
        self._num_ids = self._tokenizer.get_vocab_size(with_added_tokens=True)
        specials = {
            token.content: token_id
            for token_id, token in self._tokenizer.get_added_tokens_decoder().items()
            if token.special
        }

        def first(names):
            return next((specials[n] for n in names if n in specials), None)

        own = {"pad": first(PAD_NAMES), "bos": first(BOS_NAMES), "eos": first(EOS_NAMES)}
        ids, num_ids = _special_ids(own, self._num_ids)
        self.pad_id, self.bos_id, self.eos_id = ids["pad"], ids["bos"], ids["eos"]
        self.num_ids = num_ids
        self.vocab_size = padded_vocab_size(num_ids)

    def _encode_batch(self, texts):
        encoded = self._tokenizer.encode_batch([_as_text(t) for t in texts], add_special_tokens=False)
        return [np.asarray(e.ids, np.int32) for e in encoded]

    def _decode(self, ids_N):
        keep = ids_N < self._num_ids
        return self._tokenizer.decode(ids_N[keep].tolist(), skip_special_tokens=True)


BYTE = ByteTokenizer()
_SCHEMES = {"sentencepiece:": SentencePieceTokenizer, "hf:": HuggingFaceTokenizer}


def get_tokenizer(spec: str | Tokenizer | None = None) -> Tokenizer:
    """The tokenizer a config names: ``"byte"`` (also ``None``), ``"sentencepiece:<path>"``, ``"hf:<path>"``.

    A :class:`Tokenizer` is returned as is.
    """
    if isinstance(spec, Tokenizer):
        return spec
    if spec is None or spec == "byte":
        return BYTE
    if not isinstance(spec, str):
        raise ValueError(f"tokenizer must be a spec string or a Tokenizer, got {type(spec).__name__}")
    for prefix, cls in _SCHEMES.items():
        if spec.startswith(prefix):
            return cls(_read_bytes(spec[len(prefix) :], prefix), spec=spec)
    raise ValueError(
        f"unknown tokenizer {spec!r}; expected 'byte', 'sentencepiece:<path to .model>' or "
        "'hf:<path to tokenizer.json>'"
    )


def encode(text: str | bytes, *, bos: bool = False, eos: bool = False) -> np.ndarray:
    """Byte token ids (int32 [n]) of ``text``'s UTF-8 bytes, optionally framed by BOS / EOS."""
    return BYTE.encode(text, bos=bos, eos=eos)


def decode(ids) -> str:
    """Text of the byte ids in ``ids``; special and unused ids are skipped."""
    return BYTE.decode(ids)
