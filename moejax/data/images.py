"""grain input pipeline for TFDS image-classification datasets (``digits_images``, any prepared one).

```python
it = moejax.data.images.create_image_iterator("digits_images", split="train", batch_size=64)
batch = next(it)   # {"images": float32 [64, 8, 8, 1] in [0, 1], "labels": int32 [64]}
```

Images are scaled to ``[0, 1]`` by the dataset's maximum pixel value (16 for ``digits_images``, 255
for uint8 image datasets), shuffled with grain's index shuffle (a fresh permutation per epoch),
repeated ``num_epochs`` times and cut into global batches of which each process reads its own rows,
as the text pipeline does; the iterator state (``get_state``/``set_state``) resumes exactly.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator

import grain
import jax
import numpy as np

from moejax.data import digits_images
from moejax.data.pipeline import load_builder, process_batches

# Pixel value that maps to 1.0, per dataset base name (uint8 images: 255).
_MAX_VALUES = {"digits_images": digits_images.MAX_VALUE}


@dataclasses.dataclass(frozen=True)
class ImageFingerprint:
    name: str
    split: str
    global_batch_size: int
    seed: int
    shuffle: bool
    num_epochs: int | None


class ImageIterator(Iterator[dict[str, np.ndarray]]):
    """Per-process batches ``{"images": float32 [B, H, W, C], "labels": int32 [B]}``."""

    def __init__(self, dataset: grain.MapDataset, fingerprint: ImageFingerprint,
                 num_classes: int, image_shape: tuple[int, ...]):
        self._fingerprint = fingerprint
        self.num_classes = num_classes
        self.image_shape = image_shape
        self._iterator = iter(dataset.to_iter_dataset(
            grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)))

    def __iter__(self) -> ImageIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iterator)

    def get_state(self) -> bytes:
        state = {"pipeline": dataclasses.asdict(self._fingerprint),
                 "grain": self._iterator.get_state()}
        return json.dumps(state, sort_keys=True).encode("utf-8")

    def set_state(self, state: bytes) -> None:
        decoded = json.loads(state)
        expected = dataclasses.asdict(self._fingerprint)
        if decoded.get("pipeline") != expected:
            raise ValueError(f"state was saved by a different image pipeline: saved "
                             f"{decoded.get('pipeline')}, now {expected}")
        self._iterator.set_state(decoded["grain"])


def create_image_iterator(name: str, *, split: str, batch_size: int, seed: int = 0,
                          data_dir: str | None = None, shuffle: bool = True,
                          num_epochs: int | None = None, image_key: str = "image",
                          label_key: str = "label", process_index: int | None = None,
                          process_count: int | None = None) -> ImageIterator:
    """Batches of ``name``'s ``split`` for this process (``batch_size`` rows per process)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    builder = load_builder(name, data_dir)
    features = builder.info.features
    for key, what in ((image_key, "image_key"), (label_key, "label_key")):
        if key not in features.keys():
            raise ValueError(f"{what} {key!r} is not a feature of {name!r}; features: "
                             f"{sorted(features.keys())}")
    if split.split("[")[0] not in builder.info.splits:
        raise ValueError(f"unknown split {split!r} of {name!r}; expected one of "
                         f"{sorted(builder.info.splits)}")
    image_shape = tuple(features[image_key].shape)
    if len(image_shape) != 3 or None in image_shape:
        raise ValueError(f"{name!r}'s {image_key!r} must have a static [H, W, C] shape, got "
                         f"{image_shape}")
    num_classes = int(features[label_key].num_classes)
    scale = 1.0 / _MAX_VALUES.get(name.split(":")[0].split("/")[0], 255)

    def make_row(record):
        return {"images": np.asarray(record[image_key], np.float32) * np.float32(scale),
                "labels": np.int32(record[label_key])}

    rows = grain.MapDataset.source(builder.as_data_source(split=split))
    chunks, global_batch_size = process_batches(rows, make_row, batch_size=batch_size, seed=seed,
                                                shuffle=shuffle, num_epochs=num_epochs,
                                                process_count=process_count)
    fingerprint = ImageFingerprint(name, split, global_batch_size, seed, shuffle, num_epochs)
    return ImageIterator(chunks[process_index::process_count], fingerprint, num_classes,
                         image_shape)
