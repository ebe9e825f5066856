"""TFDS builders: ``stdlib_text`` (files, splits, caps), ``instruct_synth`` (families, answers, splits)."""

import hashlib
import pathlib
import re
import sysconfig
import threading

import pytest

from moejax import data
from moejax.data import instruct_synth
from moejax.data.stdlib_text import stdlib_files

STDLIB_ROOT = pathlib.Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def _read(builder, split, key):
    source = builder.as_data_source(split=split)
    return [record[key].decode() for record in source.__getitems__(range(len(source)))]


def _is_validation(path: str) -> bool:
    return int(hashlib.sha1(path.encode()).hexdigest()[:16], 16) % 20 == 0


# ------------------------------------------------------------------------------------------ stdlib_text


def test_stdlib_text_splits_by_path_hash_and_are_disjoint(data_dir):
    builder = data.load_builder("stdlib_text/small", data_dir)
    train, validation = _read(builder, "train", "path"), _read(builder, "validation", "path")
    assert len(train) == len(validation) == 16
    assert not set(train) & set(validation)
    assert not any(_is_validation(p) for p in train)
    assert all(_is_validation(p) for p in validation)


def test_stdlib_text_examples_are_the_files_on_disk(data_dir):
    source = data.load_builder("stdlib_text/small", data_dir).as_data_source(split="validation")
    for i in range(0, len(source), 7):
        assert source[i]["text"] == (STDLIB_ROOT / source[i]["path"].decode()).read_bytes()


def test_stdlib_text_is_identical_when_prepared_again(data_dir, tmp_path):
    first = data.load_builder("stdlib_text/small", data_dir)
    second = data.load_builder("stdlib_text/small", str(tmp_path))
    for split in ("train", "validation"):
        assert _read(first, split, "path") == _read(second, split, "path")


def test_stdlib_text_is_prepared_once(data_dir):
    builder = data.load_builder("stdlib_text/small", data_dir)
    files = sorted(pathlib.Path(builder.data_dir).glob("*.array_record*"))
    mtimes = [f.stat().st_mtime_ns for f in files]
    data.load_builder("stdlib_text/small", data_dir)
    assert files and [f.stat().st_mtime_ns for f in files] == mtimes


def test_concurrent_preparation_in_one_data_dir_succeeds(tmp_path):
    builders, errors = [], []

    def prepare():
        try:
            builders.append(data.load_builder("stdlib_text/small", str(tmp_path)))
        except Exception as e:  # noqa: BLE001 - the test reports any failure of either thread
            errors.append(e)

    threads = [threading.Thread(target=prepare) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [b.info.splits["train"].num_examples for b in builders] == [16, 16]


def _tree(root: pathlib.Path, files: dict[str, int]) -> None:
    for rel, size in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x" * size)


def test_stdlib_files_excludes_tests_site_packages_and_non_python(tmp_path):
    kept = ["a.py", "pkg/b.py", "pkg/testing.py", "test_top.py"]
    dropped = ["test/c.py", "pkg/tests/d.py", "idlelib/idle_test/e.py", "site-packages/f.py", "g.txt"]
    _tree(tmp_path, dict.fromkeys(kept + dropped, 10))
    files = stdlib_files(tmp_path)
    assert sorted(files["train"] + files["validation"]) == sorted(kept)


def test_stdlib_files_caps_keep_the_first_files_in_hash_order(tmp_path):
    paths = [f"m{i}.py" for i in range(200)]
    _tree(tmp_path, dict.fromkeys(paths, 100))
    by_hash = sorted(paths, key=lambda p: hashlib.sha1(p.encode()).digest()[:8])
    train_order = [p for p in by_hash if not _is_validation(p)]
    assert stdlib_files(tmp_path, max_files_per_split=3)["train"] == train_order[:3]
    capped = stdlib_files(tmp_path, max_bytes=1000)
    assert sorted(capped["train"] + capped["validation"]) == sorted(by_hash[:10])


def test_stdlib_files_without_python_files_raises(tmp_path):
    with pytest.raises(ValueError, match="no .py files"):
        stdlib_files(tmp_path)


# ---------------------------------------------------------------------------------------- instruct_synth

CATEGORY_OF = {"cat": "animal", "wolf": "animal", "red": "color", "pink": "color", "banana": "fruit",
               "plum": "fruit", "hammer": "tool", "axe": "tool"}


def _numbers(text):
    return [int(x) for x in text.split(", ")]


def _table(text):
    return dict(pair.split("->") for pair in text.split(", "))


# Each family's answer computed from the fields parsed out of its prompt.
REFERENCE_ANSWER = {
    "copy": lambda f: f["s"],
    "reverse": lambda f: f["s"][::-1],
    "sort": lambda f: ", ".join(str(x) for x in sorted(_numbers(f["xs"]))),
    "add": lambda f: str(int(f["a"]) + int(f["b"])),
    "count": lambda f: str(f["s"].count(f["c"])),
    "lookup": lambda f: dict(p.split("=") for p in f["pairs"].split(", "))[f["k"]],
    "substitute": lambda f: "".join(_table(f["table"]).get(ch, ch) for ch in f["s"]),
    "classify": lambda f: CATEGORY_OF.get(f["w"]),
    "uppercase": lambda f: f["s"].upper(),
    "max": lambda f: str(max(_numbers(f["xs"]))),
    "min": lambda f: str(min(_numbers(f["xs"]))),
    "subtract": lambda f: str(int(f["a"]) - int(f["b"])),
    "reverse_words": lambda f: " ".join(f["s"].split()[::-1]),
}


def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template)
    pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>.+?)", pattern)
    return re.compile(f"^{pattern}$")


def _parse(family: str, prompt: str) -> tuple[int, dict[str, str]]:
    body = prompt.removesuffix(instruct_synth.ANSWER_MARKER)
    for index, template in enumerate(instruct_synth.templates(family)):
        match = _template_regex(template).match(body)
        if match:
            return index, match.groupdict()
    raise AssertionError(f"prompt of {family} matches none of its templates: {prompt!r}")


def test_there_are_at_least_eight_families_some_held_out():
    assert set(REFERENCE_ANSWER) == set(instruct_synth.FAMILIES)
    assert len(instruct_synth.FAMILIES) >= 8
    held_out = set(instruct_synth.HELD_OUT_FAMILIES)
    assert 2 <= len(held_out) < len(instruct_synth.FAMILIES)
    assert held_out <= set(instruct_synth.FAMILIES)
    assert not held_out & set(instruct_synth.TRAIN_FAMILIES)


@pytest.mark.parametrize("family", instruct_synth.FAMILIES)
def test_every_answer_matches_an_independent_solution(family):
    for prompt, answer in instruct_synth.make_examples(family, 100, seed=3):
        assert prompt.endswith(instruct_synth.ANSWER_MARKER)
        _, fields = _parse(family, prompt)
        expected = REFERENCE_ANSWER[family](fields)
        if family == "classify":
            assert answer in {"animal", "color", "fruit", "tool"}
            assert expected in (None, answer)
        else:
            assert answer == expected, prompt


@pytest.mark.parametrize("family", instruct_synth.FAMILIES)
def test_every_template_of_a_family_is_used(family):
    used = {_parse(family, p)[0] for p, _ in instruct_synth.make_examples(family, 60, seed=0)}
    assert used == set(range(len(instruct_synth.templates(family))))
    assert len(instruct_synth.templates(family)) >= 3


def test_examples_are_deterministic_in_the_seed_and_extend_with_n():
    ten = instruct_synth.make_examples("sort", 10, seed=5)
    assert instruct_synth.make_examples("sort", 10, seed=5) == ten
    assert instruct_synth.make_examples("sort", 4, seed=5) == ten[:4]
    assert instruct_synth.make_examples("sort", 10, seed=6) != ten


def test_every_example_fits_max_len():
    for family in instruct_synth.FAMILIES:
        for prompt, answer in instruct_synth.make_examples(family, 500, seed=1):
            assert len((prompt + answer).encode()) + 2 <= instruct_synth.MAX_LEN


def test_training_splits_hold_only_training_families(data_dir):
    builder = data.load_builder("instruct_synth", data_dir)
    for split in ("train", "validation"):
        assert set(_read(builder, split, "family")) == set(instruct_synth.TRAIN_FAMILIES)


def test_every_family_has_its_own_eval_split(data_dir):
    builder = data.load_builder("instruct_synth", data_dir)
    for family in instruct_synth.FAMILIES:
        assert set(_read(builder, f"eval_{family}", "family")) == {family}


def test_every_family_has_a_task_split_for_single_task_fine_tuning(data_dir):
    builder = data.load_builder("instruct_synth", data_dir)
    for family in instruct_synth.FAMILIES:
        assert builder.info.splits[f"task_{family}"].num_examples == instruct_synth.TASK_PER_FAMILY
        assert set(_read(builder, f"task_{family}", "family")) == {family}
    # Its own draw: not the evaluation examples of the same family.
    task = set(_read(builder, "task_min", "prompt"))
    assert not task & set(_read(builder, "eval_min", "prompt"))


def test_exact_match_accuracy_counts_first_line_matches():
    examples = instruct_synth.make_examples("add", 4, seed=9)
    answers = {prompt: answer for prompt, answer in examples}

    def half_right(prompts):
        return [f" {answers[p]}\nmore text" if i % 2 == 0 else "wrong" for i, p in enumerate(prompts)]

    assert instruct_synth.exact_match_accuracy(lambda ps: [answers[p] for p in ps], "add", 4, 9) == 1.0
    assert instruct_synth.exact_match_accuracy(half_right, "add", 4, 9) == 0.5
    assert instruct_synth.exact_match_accuracy(lambda ps: [""] * len(ps), "add", 4, 9) == 0.0


def test_instruct_synth_bad_input_raises():
    with pytest.raises(ValueError, match="unknown family 'divide'"):
        instruct_synth.make_examples("divide", 3, seed=0)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        instruct_synth.exact_match_accuracy(lambda ps: ps, "add", 0, seed=0)
    with pytest.raises(ValueError, match="returned 1 texts for 2 prompts"):
        instruct_synth.exact_match_accuracy(lambda ps: ["1"], "add", 2, seed=0)
