"""Data for moejax: TFDS builders (``stdlib_text``, ``instruct_synth``), tokenizers, a grain pipeline.

No TensorFlow is needed: datasets are prepared as array_record files and read with grain.

```python
it = moejax.data.create_iterator("stdlib_text", split="train", seq_len=128, batch_size=8)
batch = next(it)              # {"inputs", "targets": int32 [8, 128], "weights": float32 [8, 128]}
state = it.get_state()        # bytes; it.set_state(state) resumes exactly

tok = moejax.data.get_tokenizer("sentencepiece:/path/to/spm.model")   # or "byte", "hf:.../tokenizer.json"
it = moejax.data.create_iterator("c4/en", data_dir="/mnt/tfds", split="train", seq_len=2048,
                                 batch_size=8, tokenizer=tok)
it = moejax.data.create_iterator("c4/en", data_dir="/mnt/tfds", split="train", seq_len=2048,
                                 batch_size=8, tokenizer=tok, stream=True)  # no pre-read, no cache
```

Train a SentencePiece model on any dataset: ``python -m moejax.data.train_tokenizer --dataset=stdlib_text
--vocab_size=8192`` (see :mod:`moejax.data.train_tokenizer`).
"""

from moejax.data import instruct_synth, stdlib_text
from moejax.data.pipeline import (
    DEFAULT_DATA_DIR,
    DataIterator,
    StreamedText,
    available_datasets,
    create_iterator,
    default_cache_dir,
    instruct_row,
    load_builder,
    make_global_batch,
    token_stream,
)
from moejax.data.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    VOCAB_SIZE,
    ByteTokenizer,
    HuggingFaceTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    decode,
    encode,
    get_tokenizer,
    padded_vocab_size,
)

__all__ = [
    "BOS_ID",
    "DEFAULT_DATA_DIR",
    "EOS_ID",
    "PAD_ID",
    "VOCAB_SIZE",
    "ByteTokenizer",
    "DataIterator",
    "HuggingFaceTokenizer",
    "SentencePieceTokenizer",
    "StreamedText",
    "Tokenizer",
    "available_datasets",
    "create_iterator",
    "decode",
    "default_cache_dir",
    "encode",
    "get_tokenizer",
    "instruct_row",
    "instruct_synth",
    "load_builder",
    "make_global_batch",
    "padded_vocab_size",
    "stdlib_text",
    "token_stream",
]
