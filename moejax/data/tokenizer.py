"""Byte-level tokenizer: three special ids, then the 256 byte values, padded to a lane-aligned vocabulary.

Ids: ``PAD_ID = 0``, ``BOS_ID = 1``, ``EOS_ID = 2``, byte ``b`` -> ``b + 3`` (ids 3..258).
``VOCAB_SIZE = 384`` (3 x 128): the embedding and logit matrices then tile into 128-wide TPU lanes with no
padding, and the vocab axis divides by every power-of-two tensor-parallel size up to 128. Ids 259..383
never occur in data; the model learns to give them no mass within the first steps.

Any text round-trips exactly (``decode(encode(s)) == s`` for every ``str``); ``decode`` replaces bytes that
are not valid UTF-8 (a generated sequence can stop mid-character) and skips special and unused ids.
"""

from __future__ import annotations

import numpy as np

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
BYTE_OFFSET = 3
VOCAB_SIZE = 384


def encode(text: str | bytes, *, bos: bool = False, eos: bool = False) -> np.ndarray:
    """Token ids (int32 [n]) of ``text``'s UTF-8 bytes, optionally framed by BOS / EOS."""
    if isinstance(text, str):
        text = text.encode("utf-8")
    elif not isinstance(text, bytes):
        raise ValueError(f"text must be str or bytes, got {type(text).__name__}")
    ids = np.frombuffer(text, dtype=np.uint8).astype(np.int32) + BYTE_OFFSET
    parts = ([np.array([BOS_ID], np.int32)] if bos else []) + [ids]
    if eos:
        parts.append(np.array([EOS_ID], np.int32))
    return np.concatenate(parts) if len(parts) > 1 else ids


def decode(ids) -> str:
    """Text of the byte ids in ``ids``; special and unused ids are skipped."""
    ids_N = np.asarray(ids).reshape(-1).astype(np.int64)
    byte_ids = ids_N[(ids_N >= BYTE_OFFSET) & (ids_N < BYTE_OFFSET + 256)]
    return (byte_ids - BYTE_OFFSET).astype(np.uint8).tobytes().decode("utf-8", errors="replace")
