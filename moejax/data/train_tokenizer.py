"""Train a SentencePiece tokenizer on a dataset, offline.

``python -m moejax.data.train_tokenizer --dataset=stdlib_text --vocab_size=8192`` writes
``~/.cache/moejax/tokenizers/stdlib_text-train-bpe8192.model`` (or ``--output``) and prints the spec to put in
a config: ``tokenizer = "sentencepiece:<path>"``. Any dataset ``create_iterator`` reads works
(``--dataset=c4/en --data_dir=gs://... --max_documents=1000000``).

The model is made to round-trip any text exactly: no normalization, no dummy prefix, whitespace kept
(runs of spaces and indentation become pieces of their own), digits split, and byte fallback for characters
outside the vocabulary. Ids: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, ``<unk>`` 3 (the byte tokenizer's PAD / BOS /
EOS ids), then the 256 byte pieces, then the learned pieces: ``vocab_size`` ids in all.
"""

from __future__ import annotations

import argparse
import io
import os
from collections.abc import Iterable, Iterator

from etils import epath

MAX_PIECE_SOURCE_BYTES = 4096
_SPECIAL_IDS = {"pad_id": 0, "bos_id": 1, "eos_id": 2, "unk_id": 3}
# Fewer ids than this leave no room for learned pieces next to the specials and the 256 byte pieces.
MIN_VOCAB_SIZE = len(_SPECIAL_IDS) + 256 + 1


def _sentences(texts: Iterable[str | bytes]) -> Iterator[str]:
    """Each text cut at line ends into pieces of at most ``MAX_PIECE_SOURCE_BYTES`` UTF-8 bytes.

    SentencePiece skips longer training sentences; a line longer than that is cut between characters.
    """
    for text in texts:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        chunk, chunk_bytes = [], 0
        for line in text.splitlines(keepends=True):
            size = len(line.encode("utf-8"))
            if chunk and chunk_bytes + size > MAX_PIECE_SOURCE_BYTES:
                yield "".join(chunk)
                chunk, chunk_bytes = [], 0
            while size > MAX_PIECE_SOURCE_BYTES:
                head = line.encode("utf-8")[:MAX_PIECE_SOURCE_BYTES].decode("utf-8", errors="ignore")
                yield head
                line = line[len(head) :]
                size = len(line.encode("utf-8"))
            chunk.append(line)
            chunk_bytes += size
        if chunk:
            yield "".join(chunk)


def train_sentencepiece(
    texts: Iterable[str | bytes], *, vocab_size: int, model_type: str = "bpe", num_threads: int | None = None
) -> bytes:
    """The ``.model`` file contents of a SentencePiece tokenizer trained on ``texts``."""
    import sentencepiece

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be an integer >= {MIN_VOCAB_SIZE}, got {vocab_size!r}")
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=_sentences(texts),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            byte_fallback=True,
            character_coverage=0.9995,  # rarer characters are byte pieces
            max_sentence_length=MAX_PIECE_SOURCE_BYTES,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2,
            **_SPECIAL_IDS,
        )
    except RuntimeError as e:
        if "required_chars" not in str(e):
            raise
        # Every character of the covered set needs a piece of its own besides the 256 byte pieces.
        raise ValueError(
            f"vocab_size = {vocab_size} is too small for the characters of this corpus: {e}"
        ) from e
    return model.getvalue()


def dataset_texts(
    dataset: str, *, split: str = "train", data_dir: str | None = None, text_key: str = "text",
    max_documents: int | None = None,
) -> Iterator[bytes]:
    """The ``text_key`` field of the first ``max_documents`` (all if None) documents of ``dataset``."""
    from moejax.data import pipeline

    builder = pipeline.load_builder(dataset, data_dir)
    if text_key not in builder.info.features.keys():
        features = sorted(builder.info.features.keys())
        raise ValueError(f"text_key {text_key!r} is not a feature of {dataset!r}; features: {features}")
    source = builder.as_data_source(split=split)
    count = len(source) if max_documents is None else min(max_documents, len(source))
    for start in range(0, count, 1024):
        for record in source.__getitems__(range(start, min(start + 1024, count))):
            yield record[text_key]


def default_output(dataset: str, split: str, model_type: str, vocab_size: int) -> str:
    name = dataset.replace("/", "_").replace(":", "_")
    return os.path.expanduser(f"~/.cache/moejax/tokenizers/{name}-{split}-{model_type}{vocab_size}.model")


def main(argv: list[str] | None = None) -> str:
    """Train, write the model and print (and return) its tokenizer spec."""
    parser = argparse.ArgumentParser(
        prog="python -m moejax.data.train_tokenizer", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--dataset", default="stdlib_text", help="any name create_iterator reads")
    parser.add_argument("--split", default="train")
    parser.add_argument("--data_dir", default=None, help="TFDS data_dir (default: moejax's)")
    parser.add_argument("--text_key", default="text", help="text feature of the dataset")
    parser.add_argument("--vocab_size", type=int, default=8192, help="ids in all (specials, bytes)")
    parser.add_argument("--model_type", choices=("bpe", "unigram"), default="bpe")
    parser.add_argument("--max_documents", type=int, default=None, help="train on the first N documents")
    parser.add_argument("--output", default=None, help="where to write the .model file (local or gs://)")
    args = parser.parse_args(argv)
    texts = dataset_texts(
        args.dataset, split=args.split, data_dir=args.data_dir, text_key=args.text_key,
        max_documents=args.max_documents,
    )
    model = train_sentencepiece(texts, vocab_size=args.vocab_size, model_type=args.model_type)
    output = args.output or default_output(args.dataset, args.split, args.model_type, args.vocab_size)
    path = epath.Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model)
    spec = f"sentencepiece:{output}"
    print(spec)
    return spec


if __name__ == "__main__":
    main()
