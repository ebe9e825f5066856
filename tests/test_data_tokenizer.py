"""Byte tokenizer: ids layout, exact round trip, specials skipped on decode."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moejax import data


def test_special_ids_and_vocab_layout():
    assert (data.PAD_ID, data.BOS_ID, data.EOS_ID) == (0, 1, 2)
    assert data.VOCAB_SIZE % 128 == 0
    assert data.VOCAB_SIZE >= 3 + 256


def test_bytes_map_to_their_value_plus_three():
    ids = data.encode(bytes([0, 65, 255]))
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids, [3, 68, 258])


def test_bos_and_eos_frame_the_text():
    np.testing.assert_array_equal(data.encode("A", bos=True, eos=True), [1, 68, 2])


@given(st.text())
def test_decode_inverts_encode(text):
    assert data.decode(data.encode(text)) == text


def test_decode_skips_special_and_unused_ids():
    ids = [data.BOS_ID, 3 + ord("h"), data.PAD_ID, 3 + ord("i"), data.EOS_ID, data.VOCAB_SIZE - 1]
    assert data.decode(np.array(ids)) == "hi"


def test_encode_rejects_non_text():
    with pytest.raises(ValueError, match="text must be str or bytes"):
        data.encode([1, 2, 3])
