"""``instruct_synth``: synthetic instruction-following tasks for instruction tuning (Flan-MoE style).

Thirteen task families, each with three phrasings (templates) of the instruction. Ten families are for
training; ``HELD_OUT_FAMILIES`` (``min``, ``subtract``, ``reverse_words``) never appear in the training
splits and measure zero-shot generalisation: each is a near neighbour of a trained family (``max`` /
``sort``, ``add``, ``reverse`` / ``copy``) phrased in a way the model has not seen.

An example is a ``(prompt, answer)`` pair of strings. Every prompt ends with ``ANSWER_MARKER``; the
training sequence is ``[BOS] prompt answer [EOS]`` with the loss on ``answer`` and ``EOS`` only, and it is
at most ``MAX_LEN`` tokens long. ``make_examples(family, n, seed)`` is deterministic in its arguments, and
a larger ``n`` extends a smaller one.

TFDS builder splits (features ``prompt``, ``answer``, ``family``):
``train`` (2000 examples per training family, seed 0), ``validation`` (100 per training family, seed 1),
``eval_<family>`` for every family, held-out ones included (200 examples, seed 2), and ``task_<family>`` for
every family (2000 examples, seed 3): the training set of single-task fine-tuning, where a held-out family
becomes the downstream task. Small input spaces (``add``, ``subtract``: 10 000 operand pairs) mean an
evaluation example may also occur in a training split; the held-out families never occur in ``train``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import tensorflow_datasets as tfds
from etils import epath

ANSWER_MARKER = "\nAnswer: "
MAX_LEN = 128

_WORDS = (
    "apple", "river", "stone", "cloud", "green", "house", "light", "music", "paper", "quiet",
    "sun", "tree", "bird", "road", "lamp", "cup", "door", "fish", "moon", "rain",
    "sand", "ship", "wind", "star", "book", "coin", "fire", "gold", "hill", "leaf",
)
_CATEGORIES = {
    "animal": ("cat", "dog", "horse", "tiger", "mouse", "eagle", "shark", "frog", "sheep", "wolf"),
    "color": ("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "brown", "pink"),
    "fruit": ("apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "pear", "plum", "melon"),
    "tool": ("hammer", "saw", "drill", "wrench", "chisel", "shovel", "rake", "pliers", "axe", "file"),
}
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _numbers(rng: random.Random) -> list[int]:
    return [rng.randrange(100) for _ in range(rng.randint(3, 7))]


def _listed(xs: Sequence) -> str:
    return ", ".join(str(x) for x in xs)


def _letters(rng: random.Random, lo: int, hi: int, alphabet: str = _LETTERS) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def _copy(rng):
    s = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 4)))
    return {"s": s}, s


def _reverse(rng):
    s = _letters(rng, 3, 10)
    return {"s": s}, s[::-1]


def _sort(rng):
    xs = _numbers(rng)
    return {"xs": _listed(xs)}, _listed(sorted(xs))


def _add(rng):
    a, b = rng.randrange(100), rng.randrange(100)
    return {"a": a, "b": b}, str(a + b)


def _count(rng):
    c = rng.choice("abcd")
    s = _letters(rng, 5, 12, "abcd")
    return {"c": c, "s": s}, str(s.count(c))


def _lookup(rng):
    keys = rng.sample(_LETTERS, rng.randint(3, 5))
    values = [rng.randrange(100) for _ in keys]
    i = rng.randrange(len(keys))
    return {"pairs": _listed(f"{k}={v}" for k, v in zip(keys, values)), "k": keys[i]}, str(values[i])


def _substitute(rng):
    sources = rng.sample(_LETTERS, rng.randint(2, 3))
    table = dict(zip(sources, rng.sample(_LETTERS, len(sources))))
    s = _letters(rng, 4, 10, "".join(sources) + rng.choice(_LETTERS))
    answer = "".join(table.get(ch, ch) for ch in s)
    return {"table": _listed(f"{a}->{b}" for a, b in table.items()), "s": s}, answer


def _classify(rng):
    category = rng.choice(sorted(_CATEGORIES))
    return {"w": rng.choice(_CATEGORIES[category])}, category


def _uppercase(rng):
    s = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 3)))
    return {"s": s}, s.upper()


def _max(rng):
    xs = _numbers(rng)
    return {"xs": _listed(xs)}, str(max(xs))


def _min(rng):
    xs = _numbers(rng)
    return {"xs": _listed(xs)}, str(min(xs))


def _subtract(rng):
    a, b = sorted((rng.randrange(100), rng.randrange(100)), reverse=True)
    return {"a": a, "b": b}, str(a - b)


def _reverse_words(rng):
    words = [rng.choice(_WORDS) for _ in range(rng.randint(2, 5))]
    return {"s": " ".join(words)}, " ".join(reversed(words))


# family -> (sampler of (template fields, answer), templates)
_FAMILIES: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "copy": (_copy, ("Repeat exactly: {s}", "Copy this text: {s}", "Write back the following: {s}")),
    "reverse": (
        _reverse,
        ("Reverse the letters: {s}", "Write {s} backwards.", "Spell '{s}' in reverse order."),
    ),
    "sort": (
        _sort,
        (
            "Sort from smallest to largest: {xs}",
            "Put in ascending order: {xs}",
            "Arrange {xs} in increasing order.",
        ),
    ),
    "add": (_add, ("What is {a} + {b}?", "Add {a} and {b}.", "Compute the sum of {a} and {b}.")),
    "count": (
        _count,
        (
            "How many times does '{c}' appear in '{s}'?",
            "Count the letter {c} in {s}.",
            "In '{s}', count occurrences of '{c}'.",
        ),
    ),
    "lookup": (
        _lookup,
        ("Given {pairs}, what is the value of {k}?", "Table: {pairs}. Look up {k}.", "{pairs}. Find {k}."),
    ),
    "substitute": (
        _substitute,
        (
            "Replace letters using {table}: {s}",
            "Apply the mapping {table} to {s}.",
            "Substitute {table} in {s}.",
        ),
    ),
    "classify": (
        _classify,
        (
            "Is '{w}' an animal, a color, a fruit or a tool?",
            "Which category (animal, color, fruit, tool) does {w} belong to?",
            "Classify {w} as animal, color, fruit or tool.",
        ),
    ),
    "uppercase": (
        _uppercase,
        ("Convert to uppercase: {s}", "Write {s} in capital letters.", "Uppercase this: {s}"),
    ),
    "max": (
        _max,
        ("What is the largest of {xs}?", "Find the maximum of {xs}.", "Which number is biggest: {xs}?"),
    ),
    "min": (
        _min,
        ("What is the smallest of {xs}?", "Find the minimum of {xs}.", "Which number is lowest: {xs}?"),
    ),
    "subtract": (_subtract, ("What is {a} - {b}?", "Subtract {b} from {a}.", "Compute {a} minus {b}.")),
    "reverse_words": (
        _reverse_words,
        (
            "Reverse the order of the words: {s}",
            "Write these words from last to first: {s}",
            "List the words in reverse order: {s}",
        ),
    ),
}

FAMILIES: tuple[str, ...] = tuple(_FAMILIES)
HELD_OUT_FAMILIES: tuple[str, ...] = ("min", "subtract", "reverse_words")
TRAIN_FAMILIES: tuple[str, ...] = tuple(f for f in FAMILIES if f not in HELD_OUT_FAMILIES)


def templates(family: str) -> tuple[str, ...]:
    """The instruction phrasings of ``family`` (before ``ANSWER_MARKER`` is appended)."""
    _check_family(family)
    return _FAMILIES[family][1]


def make_examples(family: str, n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` deterministic ``(prompt, answer)`` pairs of ``family``; the template is drawn per example."""
    _check_family(family)
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    sample, family_templates = _FAMILIES[family]
    rng = random.Random(f"{family}/{seed}")
    examples = []
    for _ in range(n):
        template = family_templates[rng.randrange(len(family_templates))]
        fields, answer = sample(rng)
        examples.append((template.format(**fields) + ANSWER_MARKER, answer))
    return examples


def is_correct(prediction: str, answer: str) -> bool:
    """Exact match on the first line of the prediction, surrounding whitespace ignored."""
    lines = prediction.strip().splitlines()
    return bool(lines) and lines[0].strip() == answer


def exact_match_accuracy(
    generate_fn: Callable[[list[str]], list[str]], family: str, n: int, seed: int
) -> float:
    """Fraction of ``n`` examples of ``family`` whose generated continuation matches the answer exactly.

    ``generate_fn`` maps a list of prompts to the list of generated texts (the continuation after the
    prompt, typically decoded up to the first EOS); see ``is_correct`` for the comparison.
    """
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    examples = make_examples(family, n, seed)
    predictions = list(generate_fn([prompt for prompt, _ in examples]))
    if len(predictions) != n:
        raise ValueError(f"generate_fn returned {len(predictions)} texts for {n} prompts")
    return sum(is_correct(p, a) for p, (_, a) in zip(predictions, examples)) / n


def _check_family(family: str) -> None:
    if family not in _FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {list(FAMILIES)}")


TRAIN_PER_FAMILY, VALIDATION_PER_FAMILY, EVAL_PER_FAMILY, TASK_PER_FAMILY = 2000, 100, 200, 2000
TRAIN_SEED, VALIDATION_SEED, EVAL_SEED, TASK_SEED = 0, 1, 2, 3


class InstructSynth(tfds.core.GeneratorBasedBuilder):
    """Synthetic instruction-following tasks; held-out families only in their own splits."""

    # tfds finds a packaged builder's source through `importlib_resources`, which it does not install.
    code_path = epath.Path(__file__)

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "train, validation, eval_<family>", "1.1.0": "task_<family> splits"}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "prompt": tfds.features.Text(),
                    "answer": tfds.features.Text(),
                    "family": tfds.features.Text(),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        splits = {
            "train": self._generate_examples(TRAIN_FAMILIES, TRAIN_PER_FAMILY, TRAIN_SEED),
            "validation": self._generate_examples(TRAIN_FAMILIES, VALIDATION_PER_FAMILY, VALIDATION_SEED),
        }
        for family in FAMILIES:
            splits[f"eval_{family}"] = self._generate_examples((family,), EVAL_PER_FAMILY, EVAL_SEED)
            splits[f"task_{family}"] = self._generate_examples((family,), TASK_PER_FAMILY, TASK_SEED)
        return splits

    def _generate_examples(self, families: Sequence[str], n: int, seed: int):
        for family in families:
            for i, (prompt, answer) in enumerate(make_examples(family, n, seed)):
                yield f"{family}/{i}", {"prompt": prompt, "answer": answer, "family": family}
