"""``digits_images``: scikit-learn's bundled handwritten digits as a TFDS image-classification dataset.

1797 grey-scale 8x8 images of the digits 0-9 (the UCI "optical recognition of handwritten digits"
test set, 4x4-pixel blocks counted, values 0..16) ship inside scikit-learn, so an image experiment
needs no download. Each example is ``{"image": uint8 [8, 8, 1] (0..16), "label": int 0..9, "index":
int}`` with ``index`` the row in ``sklearn.datasets.load_digits()``.

Split: a row is in ``test`` when ``index % 5 == 0`` (360 images, 26 to 48 per class), else in
``train`` (1437): stable and reproducible, every class in both splits.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

NUM_CLASSES = 10
IMAGE_SHAPE = (8, 8, 1)
MAX_VALUE = 16
TEST_MODULUS = 5


def load_arrays() -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [1797, 8, 8, 1], labels int64 [1797])`` from scikit-learn."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - scikit-learn is an install requirement
        raise ImportError("digits_images needs scikit-learn (pip install scikit-learn)") from e
    digits = load_digits()
    images = np.round(digits.images).astype(np.uint8)[..., None]
    return images, digits.target.astype(np.int64)


def split_of(index: int) -> str:
    return "test" if index % TEST_MODULUS == 0 else "train"


class DigitsImages(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 8x8 handwritten digits, 10 classes."""

    code_path = epath.Path(__file__)
    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=IMAGE_SHAPE, dtype=np.uint8),
                "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                "index": tfds.features.Scalar(dtype=np.int64),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        images, labels = load_arrays()
        return {split: self._generate_examples(images, labels, split)
                for split in ("train", "test")}

    def _generate_examples(self, images, labels, split):
        for index in range(len(labels)):
            if split_of(index) == split:
                yield index, {"image": images[index], "label": int(labels[index]),
                              "index": index}
