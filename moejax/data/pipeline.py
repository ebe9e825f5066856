"""grain input pipeline over TFDS array_record data: tokenize, pack, shuffle, shard per process, batch.

Every dataset becomes a random-access sequence of rows of ``seq_len + 1`` tokens of the ``tokenizer``
(:func:`moejax.data.get_tokenizer`; bytes by default):

- text datasets (``stdlib_text``, any TFDS dataset prepared as array_record, e.g. ``c4/en``, ``lm1b``,
  ``wikipedia/20230601.en``, with its text feature ``text_key``): the split's documents in stored order
  form one stream ``doc_0 EOS doc_1 EOS ...``; row ``w`` is ``stream[w * seq_len : (w + 1) * seq_len + 1]``
  (consecutive rows overlap by one token, so every token of the stream is a target exactly once per
  epoch); the partial window at the end is dropped.

  Bytes: finding a window's documents needs every document's length, one pass over the split when the
  iterator is created (0.1 s for ``stdlib_text``), remembered per process; windows are encoded when read.
  A subword tokenizer: the whole stream is tokenized once per (dataset, split, text_key, tokenizer
  fingerprint) and cached on disk under ``cache_dir`` (``tokens.bin``, uint16 ids when the vocabulary
  allows, and ``info.json``), then memory-mapped; other processes and later runs reuse it.
- ``instruct_synth``: row ``i`` is example ``i`` as ``[BOS] prompt answer [EOS]``, right-padded with PAD.

Rows become ``{"inputs": row[:-1], "targets": row[1:], "weights": ...}`` (weights 1 on every target of
a text row; on the answer and EOS targets only of an instruction row). The rows are shuffled with grain's
index shuffle (a fresh permutation per epoch), repeated ``num_epochs`` times and cut into *global* batches
of ``process_count * batch_size`` rows; process ``p`` reads rows ``[p * batch_size, (p + 1) * batch_size)``
of each global batch. Hence the global batch at step ``s`` does not depend on the number of processes,
the processes' rows are disjoint, and the iterator state (the step) can be restored on any number of
processes with the same global batch size. The batches are a pure function of the arguments and the
prepared data: reader threads and the process split do not change them.

Streamed mode (``stream=True``, text datasets; :class:`StreamedText`), for splits too large to read in full
before the first step (``c4/en``'s 365M documents; the pod configs use it): nothing reads the whole split
and nothing is cached. The document indices are a lazy sequence (:func:`document_order`: shuffled with
grain's index shuffle, repeated ``num_epochs`` times, every ``process_count``-th from ``process_index``);
each process reads its own documents in blocks, tokenizes them as it reads (the next block on a
background thread) and packs its stream ``doc EOS doc EOS ...`` into windows of ``seq_len + 1`` tokens
with stride ``seq_len`` as above, ``batch_size`` a batch; with finite ``num_epochs`` its last partial
window and batch are dropped. The batches are still a pure function of the arguments, but now including
the process split: a state (the position of the next batch: a document of the process's sequence and a
token offset in it) resumes only with the same ``process_index`` and ``process_count``. An epoch is one
pass over the documents, not a permutation of windows.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import fcntl
import functools
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from moejax.data import digits_images, instruct_synth, stdlib_text
from moejax.data.tokenizer import BYTE, Tokenizer, encode, get_tokenizer

DEFAULT_DATA_DIR = "~/.cache/moejax/tfds"
# Token streams of a remote data_dir are cached here; of a local one, in data_dir/TOKEN_CACHE_SUBDIR.
DEFAULT_REMOTE_CACHE_DIR = "~/.cache/moejax/token_streams"
TOKEN_CACHE_SUBDIR = "_token_streams"
_BUILTIN_BUILDERS: dict[str, type[tfds.core.DatasetBuilder]] = {
    "digits_images": digits_images.DigitsImages,
    "instruct_synth": instruct_synth.InstructSynth,
    "stdlib_text": stdlib_text.StdlibText,
}
_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")
_doc_lengths_memo: dict[tuple[str, str, str], np.ndarray] = {}
_token_stream_memo: dict[str, np.ndarray] = {}
_instruct_max_len_memo: dict[tuple[str, str, str], int] = {}


def _base_name(name: str) -> str:
    """``"c4/en:3.1.0"`` -> ``"c4"``."""
    return name.split(":")[0].split("/")[0]


def _resolve_data_dir(data_dir: str | None) -> str:
    return os.path.expanduser(DEFAULT_DATA_DIR if data_dir is None else data_dir)


def _builtin_names(*, with_default_config: bool = False) -> list[str]:
    names = []
    for base, builder_cls in sorted(_BUILTIN_BUILDERS.items()):
        names.append(base)
        names += [
            f"{base}/{c.name}"
            for c in builder_cls.BUILDER_CONFIGS
            if with_default_config or c.name != "default"
        ]
    return names


def _prepared_datasets(data_dir: str) -> dict[str, list[epath.Path]]:
    """``name`` or ``name/config`` -> its prepared version directories, for datasets not built in here."""
    found: dict[str, list[epath.Path]] = {}
    root = epath.Path(data_dir)
    if not root.exists():
        return found
    for info in sorted(root.glob("*/*/dataset_info.json")) + sorted(root.glob("*/*/*/dataset_info.json")):
        version_dir = info.parent
        if not _VERSION_RE.match(version_dir.name):
            continue
        name = version_dir.parent.relative_to(root).as_posix()
        if _base_name(name) not in _BUILTIN_BUILDERS:
            found.setdefault(name, []).append(version_dir)
    return found


def available_datasets(data_dir: str | None = None) -> list[str]:
    """Names ``create_iterator`` accepts: the built-in builders, then the TFDS datasets in ``data_dir``."""
    return _builtin_names() + sorted(_prepared_datasets(_resolve_data_dir(data_dir)))


def load_builder(name: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """A prepared TFDS builder for ``name``; built-in datasets are prepared on first use, under a lock."""
    data_dir = _resolve_data_dir(data_dir)
    name_and_config, _, version = name.partition(":")
    if name_and_config in _builtin_names(with_default_config=True):
        return _prepare_builtin(name, data_dir)
    version_dirs = _prepared_datasets(data_dir).get(name_and_config, [])
    if version:
        version_dirs = [d for d in version_dirs if d.name == version]
    if not version_dirs:
        raise ValueError(
            f"unknown dataset {name!r}; available: {', '.join(available_datasets(data_dir))}, or any TFDS "
            f"dataset prepared (file_format='array_record') under data_dir={data_dir!r}"
        )
    builder = tfds.builder_from_directory(max(version_dirs, key=lambda d: tfds.core.Version(d.name)))
    if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
        raise ValueError(
            f"dataset {name!r} under {data_dir!r} is stored as {builder.info.file_format.value}; grain "
            "reads random-access array_record files: prepare it with file_format='array_record'"
        )
    return builder


def _prepare_builtin(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
    def make():
        return tfds.builder(name, data_dir=data_dir, file_format="array_record")

    builder = make()
    if builder.is_prepared():
        return builder
    os.makedirs(data_dir, exist_ok=True)
    # Processes on one host (tests, multi-process runs) may prepare concurrently; tfds would race on the
    # final rename of its temporary directory.
    lock_path = os.path.join(data_dir, f".{name.replace('/', '_').replace(':', '_')}.lock")
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        builder = make()
        if not builder.is_prepared():
            builder.download_and_prepare()
            builder = make()
    return builder


def _as_bytes(value) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def _doc_lengths(source, memo_key: tuple[str, str, str], text_key: str) -> np.ndarray:
    if memo_key not in _doc_lengths_memo:
        lengths_D = np.empty(len(source), np.int64)
        chunk = 1024
        for start in range(0, len(source), chunk):
            records = source.__getitems__(range(start, min(start + chunk, len(source))))
            lengths_D[start : start + len(records)] = [len(_as_bytes(r[text_key])) for r in records]
        _doc_lengths_memo[memo_key] = lengths_D
    return _doc_lengths_memo[memo_key]


class PackedText:
    """Random-access windows of ``seq_len + 1`` tokens over the stream ``doc_0 EOS doc_1 EOS ...``."""

    def __init__(self, source, doc_lengths_D: np.ndarray, text_key: str, seq_len: int):
        self._source = source
        self._text_key = text_key
        self._seq_len = seq_len
        self._doc_ends_D = np.cumsum(doc_lengths_D + 1)  # stream offset just past each doc's EOS
        num_tokens = int(self._doc_ends_D[-1]) if len(self._doc_ends_D) else 0
        self._num_windows = max(num_tokens - 1, 0) // seq_len

    def __len__(self) -> int:
        return self._num_windows

    def __getitem__(self, window: int) -> np.ndarray:
        start = window * self._seq_len
        stop = start + self._seq_len + 1
        first, last = np.searchsorted(self._doc_ends_D, [start, stop - 1], side="right")
        records = self._source.__getitems__(range(int(first), int(last) + 1))
        tokens = np.concatenate([encode(_as_bytes(r[self._text_key]), eos=True) for r in records])
        offset = int(self._doc_ends_D[first - 1]) if first > 0 else 0
        return tokens[start - offset : stop - offset]


class PackedTokens:
    """Random-access windows of ``seq_len + 1`` tokens over a tokenized stream (int32 rows)."""

    def __init__(self, stream_N: np.ndarray, seq_len: int):
        self._stream_N = stream_N
        self._seq_len = seq_len
        self._num_windows = max(len(stream_N) - 1, 0) // seq_len

    def __len__(self) -> int:
        return self._num_windows

    def __getitem__(self, window: int) -> np.ndarray:
        start = window * self._seq_len
        return np.asarray(self._stream_N[start : start + self._seq_len + 1], np.int32)


def _is_local(path: str) -> bool:
    return "://" not in path


def default_cache_dir(data_dir: str | None) -> str:
    """Where token streams of ``data_dir``'s datasets are cached when ``cache_dir`` is not given."""
    data_dir = _resolve_data_dir(data_dir)
    if _is_local(data_dir):
        return os.path.join(data_dir, TOKEN_CACHE_SUBDIR)
    return os.path.expanduser(DEFAULT_REMOTE_CACHE_DIR)


def _stream_cache_dir(builder, split: str, text_key: str, tokenizer: Tokenizer, cache_dir: str) -> epath.Path:
    key = json.dumps([str(builder.data_path), split, text_key, tokenizer.name])
    readable = re.sub(r"[^A-Za-z0-9_.=-]+", "_", f"{builder.info.full_name}-{split}-{text_key}")
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
    return epath.Path(cache_dir) / f"{readable}-{tokenizer.name}-{digest}"


def _write_token_stream(
    source, text_key: str, tokenizer: Tokenizer, directory: epath.Path, info: dict
) -> None:
    """Tokenize every document into ``directory/tokens.bin`` (through a temporary directory)."""
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32)
    tmp = directory.parent / f".{directory.name}.tmp{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    num_tokens, eos_N = 0, np.array([tokenizer.eos_id], dtype)
    with (tmp / "tokens.bin").open("wb") as out:
        for start in range(0, len(source), 1024):
            records = source.__getitems__(range(start, min(start + 1024, len(source))))
            ids = tokenizer.encode_batch([r[text_key] for r in records])
            chunk_N = np.concatenate([part for doc in ids for part in (doc.astype(dtype), eos_N)])
            out.write(chunk_N.astype(dtype.newbyteorder("<")).tobytes())
            num_tokens += len(chunk_N)
    info = info | {"dtype": dtype.name, "num_tokens": num_tokens, "num_documents": len(source)}
    (tmp / "info.json").write_text(json.dumps(info, indent=2, sort_keys=True))
    if directory.exists():  # another process finished first (a remote cache_dir is not locked)
        tmp.rmtree()
    else:
        tmp.rename(directory)


def _read_token_stream(directory: epath.Path) -> np.ndarray:
    info = json.loads((directory / "info.json").read_text())
    dtype = np.dtype(info["dtype"]).newbyteorder("<")
    if info["num_tokens"] == 0:
        return np.zeros(0, dtype)
    if _is_local(os.fspath(directory)):
        return np.memmap(os.fspath(directory / "tokens.bin"), dtype, mode="r", shape=(info["num_tokens"],))
    return np.frombuffer((directory / "tokens.bin").read_bytes(), dtype)


def token_stream(
    builder, split: str, text_key: str, tokenizer: Tokenizer, cache_dir: str
) -> np.ndarray:
    """The split's stream ``doc_0 EOS doc_1 EOS ...`` in ``tokenizer``'s ids, from (or into) the cache."""
    directory = _stream_cache_dir(builder, split, text_key, tokenizer, cache_dir)
    memo_key = os.fspath(directory)
    if memo_key in _token_stream_memo:
        return _token_stream_memo[memo_key]
    if not (directory / "info.json").exists():
        info = {
            "dataset": builder.info.full_name,
            "data_path": str(builder.data_path),
            "split": split,
            "text_key": text_key,
            "tokenizer": tokenizer.name,
            "tokenizer_spec": tokenizer.spec,
        }
        source = builder.as_data_source(split=split)
        if _is_local(cache_dir):
            os.makedirs(cache_dir, exist_ok=True)
            # Processes on one host tokenize once: the others wait here and read the result.
            with open(os.path.join(cache_dir, f".{directory.name}.lock"), "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not (directory / "info.json").exists():
                    _write_token_stream(source, text_key, tokenizer, directory, info)
        else:
            _write_token_stream(source, text_key, tokenizer, directory, info)
    _token_stream_memo[memo_key] = _read_token_stream(directory)
    return _token_stream_memo[memo_key]


def _text_row(window_T: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "inputs": window_T[:-1],
        "targets": window_T[1:],
        "weights": np.ones(len(window_T) - 1, np.float32),
    }


def instruct_row(
    prompt: str | bytes, answer: str | bytes, seq_len: int, tokenizer: Tokenizer | str | None = None
) -> dict[str, np.ndarray]:
    """One padded instruction example; ``weights`` is 1 exactly on the answer and EOS targets.

    ``[BOS] prompt answer [EOS]`` with prompt and answer encoded separately (a prompt at generation time
    is ``tokenizer.encode(prompt, bos=True)``: the same ids), right-padded with ``tokenizer.pad_id``.
    """
    tokenizer = get_tokenizer(tokenizer)
    prompt_ids = tokenizer.encode(prompt, bos=True)
    tokens = np.concatenate([prompt_ids, tokenizer.encode(answer, eos=True)]).astype(np.int32)
    if len(tokens) > seq_len + 1:
        raise ValueError(f"example of {len(tokens)} tokens does not fit seq_len + 1 = {seq_len + 1}")
    row_T = np.full(seq_len + 1, tokenizer.pad_id, np.int32)
    row_T[: len(tokens)] = tokens
    weights = np.zeros(seq_len, np.float32)
    # target j is token j + 1; the answer starts at token len(BOS prompt) and ends with EOS at len - 1.
    weights[len(prompt_ids) - 1 : len(tokens) - 1] = 1.0
    return {"inputs": row_T[:-1], "targets": row_T[1:], "weights": weights}


def _instruct_record_row(record, *, seq_len: int, tokenizer: Tokenizer) -> dict[str, np.ndarray]:
    return instruct_row(record["prompt"], record["answer"], seq_len, tokenizer)


def _instruct_max_len(source, memo_key: tuple[str, str, str], tokenizer: Tokenizer) -> int:
    """Tokens in the split's longest ``[BOS] prompt answer [EOS]``."""
    if memo_key not in _instruct_max_len_memo:
        records = source.__getitems__(range(len(source)))
        prompts = tokenizer.encode_batch([r["prompt"] for r in records])
        answers = tokenizer.encode_batch([r["answer"] for r in records])
        longest = max((len(p) + len(a) for p, a in zip(prompts, answers)), default=0)
        _instruct_max_len_memo[memo_key] = 2 + longest
    return _instruct_max_len_memo[memo_key]


@dataclasses.dataclass(frozen=True)
class _Fingerprint:
    """What a saved iterator state is only valid for (the process split is free to change)."""

    name: str
    split: str
    seq_len: int
    global_batch_size: int
    seed: int
    shuffle: bool
    num_epochs: int | None
    text_key: str
    tokenizer: str


@dataclasses.dataclass(frozen=True)
class _StreamFingerprint(_Fingerprint):
    """A streamed iterator's: its batches also depend on the process split."""

    process_index: int
    process_count: int
    stream: bool = True


class DataIterator(Iterator[dict[str, np.ndarray]]):
    """Iterator of per-process batches ``{"inputs", "targets": int32 [B, L], "weights": float32 [B, L]}``.

    ``get_state()`` returns bytes (JSON) to store next to a checkpoint; ``set_state`` on an iterator
    created with the same arguments (any process split with the same global batch) continues exactly
    from there.
    """

    def __init__(self, dataset: grain.MapDataset, fingerprint: _Fingerprint):
        self._fingerprint = fingerprint
        read_options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)
        self._iterator = iter(dataset.to_iter_dataset(read_options))

    def __iter__(self) -> DataIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iterator)

    def get_state(self) -> bytes:
        state = {"pipeline": dataclasses.asdict(self._fingerprint), "grain": self._iterator.get_state()}
        return json.dumps(state, sort_keys=True).encode("utf-8")

    def set_state(self, state: bytes) -> None:
        self._iterator.set_state(_checked_state(state, self._fingerprint, "grain"))


def _checked_state(state: bytes, fingerprint: _Fingerprint, part: str):
    """``state[part]`` after checking that ``state`` was saved by an iterator of ``fingerprint``."""
    try:
        decoded = json.loads(state)
        saved = dict(decoded["pipeline"])
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"state is not a DataIterator state: {e}") from e
    expected = dataclasses.asdict(fingerprint)
    saved_stream, now_stream = bool(saved.get("stream", False)), bool(expected.get("stream", False))
    if saved_stream != now_stream:
        mode = {True: "streamed", False: "indexed"}
        raise ValueError(
            f"state was saved by the {mode[saved_stream]} pipeline (stream={saved_stream}), not the "
            f"{mode[now_stream]} one of this iterator (stream={now_stream}): resume with the same "
            "stream setting"
        )
    saved.setdefault("tokenizer", BYTE.name)  # states saved before tokenizers were selectable
    mismatched = {k: (saved.get(k), v) for k, v in expected.items() if saved.get(k) != v}
    if mismatched:
        detail = ", ".join(f"{k}: saved {s!r}, now {n!r}" for k, (s, n) in mismatched.items())
        raise ValueError(f"state was saved by a different pipeline ({detail})")
    try:
        return decoded[part]
    except KeyError as e:
        raise ValueError(f"state is not a DataIterator state: no {part!r}") from e


def document_order(num_documents: int, *, seed: int, shuffle: bool, num_epochs: int | None,
                   process_index: int, process_count: int) -> grain.MapDataset:
    """A streamed iterator's document indices for one process, lazily (O(1) memory).

    ``range(num_documents)``, shuffled with grain's index shuffle (a fresh permutation per epoch),
    repeated ``num_epochs`` times (None: forever); the process takes every ``process_count``-th entry
    from ``process_index`` on.
    """
    order = grain.MapDataset.range(num_documents)
    if shuffle:
        order = order.shuffle(seed=_shuffle_seed(seed))
    return order.repeat(num_epochs)[process_index::process_count]


# Documents a streamed iterator reads (and tokenizes) per call to the data source.
STREAM_BLOCK_DOCS = 256


class StreamedText(Iterator[dict[str, np.ndarray]]):
    """Per-process batches packed on the fly from this process's documents (``stream=True``).

    The process's documents (:func:`document_order`) form the stream ``doc EOS doc EOS ...`` of the
    tokenizer's ids; rows are its windows of ``seq_len + 1`` tokens with stride ``seq_len`` (consecutive
    rows overlap by one token, as in the indexed mode), ``batch_size`` rows a batch. Documents are read
    and tokenized in blocks of :data:`STREAM_BLOCK_DOCS`, the next block on a background thread while
    the current one is consumed (strictly in order, so the batches do not depend on the timing).

    The trade-off against the indexed mode (:class:`DataIterator`): nothing is pre-read or cached, so the
    first batch comes at once on any dataset (``c4/en``'s 365M documents included) and memory is
    O(block); but each process packs its own documents, so the batches depend on ``process_count``
    (a saved state resumes only with the same process split), an epoch is one pass over the documents
    (not a permutation of windows: rows are shuffled only as far as the document order is) and, with
    finite ``num_epochs``, each process drops its own last partial window and batch.

    ``get_state()`` is JSON bytes: the fingerprint and the position where the next batch starts,
    ``{"document": index into this process's document sequence, "offset": token offset inside that
    document}``; ``set_state`` re-reads (and re-tokenizes) from that document and continues exactly as if
    uninterrupted.
    """

    def __init__(self, source, order: grain.MapDataset, *, text_key: str, tokenizer: Tokenizer,
                 seq_len: int, batch_size: int, fingerprint: _StreamFingerprint):
        self._source, self._order, self._num_docs = source, order, len(order)
        self._text_key, self._tokenizer = text_key, tokenizer
        self._seq_len, self._batch_size = seq_len, batch_size
        self._fingerprint = fingerprint
        self._block = STREAM_BLOCK_DOCS
        # One thread does every read, so the data source and the tokenizer are never used concurrently
        # (it ends when the iterator is collected).
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="moejax-stream")
        self._seek(0, 0)

    def _seek(self, document: int, offset: int) -> None:
        """Starts the next batch at token ``offset`` of document ``document`` of the sequence."""
        self._document, self._offset = document, offset  # the position of the buffer's first token
        self._buffer: collections.deque[np.ndarray] = collections.deque()  # documents with their EOS
        self._buffered = 0  # tokens in the buffer
        self._read_to = document  # the next document to read into the buffer
        self._pending: concurrent.futures.Future | None = None  # the block from _read_to on

    def _read_block(self, start: int) -> list[np.ndarray]:
        """Documents ``[start, start + block)`` of the sequence, tokenized, each followed by EOS."""
        indices = [int(self._order[i]) for i in range(start, min(start + self._block, self._num_docs))]
        records = self._source.__getitems__(indices)
        docs = []
        for ids in self._tokenizer.encode_batch([r[self._text_key] for r in records]):
            doc = np.empty(len(ids) + 1, np.int32)
            doc[:-1], doc[-1] = ids, self._tokenizer.eos_id
            docs.append(doc)
        return docs

    def _fill(self, need: int) -> bool:
        """Reads blocks until the buffer holds ``need`` tokens from the position; False at the end."""
        while self._buffered - self._offset < need:
            if self._read_to >= self._num_docs:
                return False
            if self._pending is None:
                self._pending = self._executor.submit(self._read_block, self._read_to)
            block = self._pending.result()
            self._read_to += len(block)
            self._pending = None
            if self._read_to < self._num_docs:  # read ahead while this block is consumed
                self._pending = self._executor.submit(self._read_block, self._read_to)
            self._buffer.extend(block)
            self._buffered += sum(len(doc) for doc in block)
        return True

    def __iter__(self) -> StreamedText:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        stride = self._batch_size * self._seq_len
        if not self._fill(stride + 1):
            raise StopIteration
        parts, held, start = [], 0, self._offset
        for doc in self._buffer:
            parts.append(doc[start : start + stride + 1 - held])
            held, start = held + len(parts[-1]), 0
            if held == stride + 1:
                break
        tokens_N = np.concatenate(parts)
        # The next batch starts at this batch's last token (its last window's final target).
        skip = self._offset + stride
        while len(self._buffer[0]) <= skip:
            skip -= len(self._buffer[0])
            self._buffered -= len(self._buffer.popleft())
            self._document += 1
        self._offset = skip
        rows = [_text_row(tokens_N[b * self._seq_len : (b + 1) * self._seq_len + 1])
                for b in range(self._batch_size)]
        return {key: np.stack([row[key] for row in rows]) for key in rows[0]}

    def get_state(self) -> bytes:
        state = {"pipeline": dataclasses.asdict(self._fingerprint),
                 "position": {"document": self._document, "offset": self._offset}}
        return json.dumps(state, sort_keys=True).encode("utf-8")

    def set_state(self, state: bytes) -> None:
        position = _checked_state(state, self._fingerprint, "position")
        try:
            document, offset = int(position["document"]), int(position["offset"])
        except (TypeError, KeyError, ValueError) as e:
            raise ValueError(f"state is not a streamed DataIterator state: {e}") from e
        if document < 0 or offset < 0:
            raise ValueError(f"state is not a streamed DataIterator state: position {position}")
        if self._pending is not None:
            self._pending.cancel()
        self._seek(document, offset)


def _check_positive(value, argument: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{argument} must be a positive integer, got {value!r}")


def _shuffle_seed(seed: int) -> int:
    """The seed handed to grain's index shuffle: mixing it makes the permutations of nearby seeds
    unrelated (grain shuffles epoch ``e`` with ``seed + e``)."""
    return int(np.random.SeedSequence(seed).generate_state(1)[0])


def process_batches(rows: grain.MapDataset, make_row, *, batch_size: int, seed: int,
                    shuffle: bool, num_epochs: int | None,
                    process_count: int) -> tuple[grain.MapDataset, int]:
    """``(chunks, global_batch_size)``: ``rows`` shuffled (a fresh permutation per epoch), repeated,
    cut to whole global batches when finite, mapped by ``make_row`` and batched per process.

    Batch k of ``chunks`` is rows ``[k * batch_size, (k + 1) * batch_size)``: global batch
    ``k // process_count``, rows of process ``k % process_count`` (take
    ``chunks[process_index::process_count]``).
    """
    if shuffle:
        rows = rows.shuffle(seed=_shuffle_seed(seed))
    rows = rows.repeat(num_epochs)
    global_batch_size = batch_size * process_count
    if num_epochs is not None:
        rows = rows[: len(rows) // global_batch_size * global_batch_size]
    return rows.map(make_row).batch(batch_size, drop_remainder=True), global_batch_size


def _check_text_key(builder, name: str, text_key: str) -> None:
    if text_key not in builder.info.features.keys():
        features = sorted(builder.info.features.keys())
        raise ValueError(f"text_key {text_key!r} is not a feature of {name!r}; features: {features}")


def create_iterator(
    name: str,
    *,
    split: str,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    data_dir: str | None = None,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    text_key: str = "text",
    tokenizer: Tokenizer | str | None = None,
    cache_dir: str | None = None,
    stream: bool = False,
) -> DataIterator | StreamedText:
    """Batches of ``name``'s ``split`` for this process; ``batch_size`` is the per-process batch.

    ``num_epochs=None`` repeats forever; otherwise the last incomplete global batch is dropped. Process
    ``process_index`` of ``process_count`` (default: this JAX process) gets its rows of every global batch.
    ``text_key`` names the text feature of a TFDS dataset (unused by ``instruct_synth``). ``tokenizer``
    is a :class:`~moejax.data.Tokenizer` or a spec for :func:`~moejax.data.get_tokenizer` (default: bytes);
    a subword tokenizer's token streams are cached under ``cache_dir`` (default: ``default_cache_dir``).
    ``stream=True`` (text datasets only): a :class:`StreamedText` that reads, tokenizes and packs only
    this process's documents as it goes (nothing pre-read or cached; batches depend on the process split).
    """
    tokenizer = get_tokenizer(tokenizer)
    _check_positive(seq_len, "seq_len")
    _check_positive(batch_size, "batch_size")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if num_epochs is not None:
        _check_positive(num_epochs, "num_epochs")
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    _check_positive(process_count, "process_count")
    if not isinstance(process_index, int) or not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index!r}")
    if stream and _base_name(name) == "instruct_synth":
        raise ValueError(f"stream=True packs text documents; {name!r} is not a text dataset "
                         "(use stream=False)")

    builder = load_builder(name, data_dir)
    if split.split("[")[0] not in builder.info.splits:
        raise ValueError(
            f"unknown split {split!r} of {name!r}; expected one of {sorted(builder.info.splits)}"
        )
    source = builder.as_data_source(split=split)
    make_row: Callable[..., dict[str, np.ndarray]]
    if stream:
        _check_text_key(builder, name, text_key)
        if len(source) == 0:
            raise ValueError(f"split {split!r} of {name!r} has no documents")
        order = document_order(len(source), seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                               process_index=process_index, process_count=process_count)
        stream_fingerprint = _StreamFingerprint(
            name, split, seq_len, batch_size * process_count, seed, shuffle, num_epochs, text_key,
            tokenizer.name, process_index, process_count,
        )
        return StreamedText(source, order, text_key=text_key, tokenizer=tokenizer, seq_len=seq_len,
                            batch_size=batch_size, fingerprint=stream_fingerprint)
    if _base_name(name) == "instruct_synth":
        if tokenizer.name == BYTE.name:
            max_len = instruct_synth.MAX_LEN
        else:
            max_len = _instruct_max_len(source, (str(builder.data_path), split, tokenizer.name), tokenizer)
        if seq_len + 1 < max_len:
            raise ValueError(
                f"seq_len must be at least {max_len - 1} for instruct_synth with tokenizer "
                f"{tokenizer.spec!r} (its longest example is {max_len} tokens), got {seq_len}"
            )
        rows = grain.MapDataset.source(source)
        make_row = functools.partial(_instruct_record_row, seq_len=seq_len, tokenizer=tokenizer)
    else:
        _check_text_key(builder, name, text_key)
        packed: PackedText | PackedTokens
        if tokenizer.name == BYTE.name:
            memo_key = (str(builder.data_path), split, text_key)
            packed = PackedText(source, _doc_lengths(source, memo_key, text_key), text_key, seq_len)
        else:
            cache_dir = default_cache_dir(data_dir) if cache_dir is None else cache_dir
            packed = PackedTokens(token_stream(builder, split, text_key, tokenizer, cache_dir), seq_len)
        if len(packed) == 0:
            raise ValueError(
                f"split {split!r} of {name!r} has fewer than seq_len + 1 = {seq_len + 1} tokens of "
                f"tokenizer {tokenizer.spec!r}"
            )
        rows = grain.MapDataset.source(packed)
        make_row = _text_row

    chunks, global_batch_size = process_batches(rows, make_row, batch_size=batch_size, seed=seed,
                                                shuffle=shuffle, num_epochs=num_epochs,
                                                process_count=process_count)
    fingerprint = _Fingerprint(
        name, split, seq_len, global_batch_size, seed, shuffle, num_epochs, text_key, tokenizer.name
    )
    return DataIterator(chunks[process_index::process_count], fingerprint)


def make_global_batch(local_batch: dict, sharding: jax.sharding.Sharding) -> dict:
    """Each process's rows as one global ``jax.Array`` per key (``process_count * B`` rows on axis 0)."""
    return {
        key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for key, value in local_batch.items()
    }
