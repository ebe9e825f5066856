"""Data for moejax: TFDS builders (``stdlib_text``, ``instruct_synth``), byte tokens, a grain pipeline.

No TensorFlow is needed: datasets are prepared as array_record files and read with grain.

```python
it = moejax.data.create_iterator("stdlib_text", split="train", seq_len=128, batch_size=8)
batch = next(it)              # {"inputs", "targets": int32 [8, 128], "weights": float32 [8, 128]}
state = it.get_state()        # bytes; it.set_state(state) resumes exactly
```
"""

from moejax.data import instruct_synth, stdlib_text
from moejax.data.pipeline import (
    DEFAULT_DATA_DIR,
    DataIterator,
    available_datasets,
    create_iterator,
    instruct_row,
    load_builder,
    make_global_batch,
)
from moejax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, decode, encode

__all__ = [
    "BOS_ID",
    "DEFAULT_DATA_DIR",
    "EOS_ID",
    "PAD_ID",
    "VOCAB_SIZE",
    "DataIterator",
    "available_datasets",
    "create_iterator",
    "decode",
    "encode",
    "instruct_row",
    "instruct_synth",
    "load_builder",
    "make_global_batch",
    "stdlib_text",
]
