"""
Seeded random and damaged inputs for the loaders, the processor and the pipelines. Each call must either give one
result per input, in order, or raise an error whose message names the input: the file and line for data files, the
key (and in a list the index) for pipeline inputs.
"""

import random
import re

import numpy as np
import pytest
from modeling_utils import tiny_model_folder
from PIL import Image
from transformers import pipeline

from hvpnet_hf import load_mner_dataset, load_mre_dataset
from hvpnet_hf.processing_hvpnet import ENTITY_MARKERS, ner_word_positions

# Strings that tokenizers, splitters and file formats handle badly.
ODD_WORDS = [
    "", " ", "\t", "\u200b", "\u00a0", "\ufeff", "\x00", "\x7f", "\x1b[31m", "\u202e", "\r", "🙂", "👩‍👩‍👧", "é", "Ａ",
    "ǅ", "#tag", "@user", "http://t.co/x", "[CLS]", "[SEP]", "[PAD]", "<s>", "</o>", "'", '"', "\\", "IMGID:3",
    "a" * 300, "Liverpool", "New York", "0",
]  # fmt: skip
TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-MISC", "I-MISC", "B-OTHER", "I-OTHER"]
LOADER_ERRORS = (ValueError, OSError)
PIPELINE_ERRORS = (ValueError, TypeError, OSError)


def random_word(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return rng.choice(ODD_WORDS)
    return "".join(chr(rng.choice([rng.randint(33, 126), rng.randint(0x80, 0x2FFF), rng.randint(0x1F300, 0x1F6FF)]))
                   for _ in range(rng.randint(1, 8)))  # fmt: skip


def random_words(rng: random.Random, longest: int = 30) -> list[str]:
    return [random_word(rng) for _ in range(rng.randint(1, longest))]


# ---------------------------------------------------------------------------------------------------------------- files


def plain_token(rng: random.Random) -> str:
    """A token the published formats can hold: no whitespace, not a block header."""
    word = "".join(random_word(rng).split()) or "x"
    return word.replace("IMGID:", "img")


def mner_text(rng: random.Random) -> tuple[str, int]:
    blocks = []
    for index in range(rng.randint(1, 5)):
        lines = [f"{plain_token(rng)}\t{rng.choice(TAGS)}" for _ in range(rng.randint(1, 6))]
        blocks.append(f"IMGID:{index}\n" + "\n".join(lines) + "\n")
    return "\n".join(blocks) + "\n", len(blocks)


def mre_text(rng: random.Random) -> tuple[str, int]:
    lines = []
    for index in range(rng.randint(1, 5)):
        tokens = [plain_token(rng) for _ in range(rng.randint(2, 8))]
        head, tail = sorted(rng.sample(range(len(tokens)), 2))
        record = {
            "token": tokens,
            "h": {"name": tokens[head], "pos": [head, head + 1]},
            "t": {"name": tokens[tail], "pos": [tail, tail + 1]},
            "img_id": f"{index}.jpg",
            "relation": rng.choice(["None", "/per/per/peer", "/per/loc/place_of_residence"]),
        }
        lines.append(repr(record))
    return "\n".join(lines) + "\n", len(lines)


def keep_content(rng: random.Random, text: str) -> bytes:
    """Changes that must not change what a file holds: a BOM, CRLF line ends, blank lines at the end."""
    if rng.random() < 0.5:
        text = text.replace("\n", "\r\n")
    return (b"\xef\xbb\xbf" if rng.random() < 0.5 else b"") + text.encode("utf-8") + b"\n" * rng.randint(0, 2)


def damage(rng: random.Random, text: str) -> bytes:
    """One random kind of damage: random bytes, a truncated line, a bad tag, odd whitespace, or all of them."""
    data = bytearray(text.encode("utf-8"))
    kind = rng.choice(["bytes", "truncate", "tag", "whitespace", "binary"])
    if kind == "bytes":
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif kind == "truncate":
        data = data[: rng.randrange(1, len(data))]
    elif kind == "tag":
        data = bytearray(re.sub(rb"\t(B|I)-", b"\tX-", bytes(data), count=1).replace(b"'h'", b"'head'", 1))
    elif kind == "whitespace":
        lines = bytes(data).split(b"\n")
        position = rng.randrange(len(lines))
        lines[position] = rng.choice([b" ", b"\t", b"\x0b", b"\xc2\xa0", b"\xe2\x80\xa8"]).join([b"", lines[position]])
        data = bytearray(b"\n".join(lines))
    else:
        data = bytearray(rng.randbytes(rng.randint(1, 200)))
    return bytes(data)


def load_rows(load, path):
    return load(data_files={"test": str(path)})["test"]


def check_loaded_or_named(load, path) -> None:
    """A damaged file loads into well-formed rows, or raises an error that names the file and, for a line's content,
    the line."""
    try:
        rows = load_rows(load, path)
    except LOADER_ERRORS as error:
        assert str(path) in str(error), error
        assert re.search(rf"{re.escape(str(path))}(:\d+|: )", str(error)), error
        return
    check_rows(rows)


def check_rows(rows) -> None:
    """Each row has a tag per word, or a head and a tail that are spans of its words."""
    for row in rows:
        if "ner_tags" in row:
            assert len(row["tokens"]) == len(row["ner_tags"])
        else:
            assert 0 <= row["head"]["start"] < row["head"]["end"] <= len(row["tokens"])
            assert 0 <= row["tail"]["start"] < row["tail"]["end"] <= len(row["tokens"])


@pytest.mark.parametrize("task", ["ner", "re"])
def test_loaders_on_random_and_damaged_files(task, tmp_path):
    rng = random.Random(f"loader-{task}")
    load, make = (load_mner_dataset, mner_text) if task == "ner" else (load_mre_dataset, mre_text)
    for index in range(25):
        text, num_rows = make(rng)
        intact = tmp_path / f"{task}_intact_{index}.txt"
        intact.write_bytes(keep_content(rng, text))
        rows = load_rows(load, intact)  # an intact file loads: any error fails the test
        assert len(rows) == num_rows
        check_rows(rows)
        damaged = tmp_path / f"{task}_damaged_{index}.txt"
        damaged.write_bytes(damage(rng, text))
        check_loaded_or_named(load, damaged)


# ------------------------------------------------------------------------------------------------------------ processor


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folders = {task: tmp_path_factory.mktemp(task) for task in ("ner", "re")}
    for task, folder in folders.items():
        tiny_model_folder(folder, task)
    return folders


def test_processor_aligns_every_word_of_random_texts(models):
    rng = random.Random("processor")
    ner = pipeline("multimodal-ner", model=str(models["ner"])).processor
    relation = pipeline("multimodal-re", model=str(models["re"])).processor
    marker_ids = relation.tokenizer.convert_tokens_to_ids(ENTITY_MARKERS)
    for _ in range(60):
        words = random_words(rng, longest=rng.choice([5, 30, 200]))
        max_length = rng.randint(3, 40)
        stride = rng.randrange(max_length - 2)
        windows = ner.encode_ner([words], max_length=max_length, stride=stride, return_overflowing_tokens=True)
        assert all(len(row) <= max_length for row in windows["input_ids"])
        positions = ner_word_positions(windows["word_ids"], len(words), windows["word_start_mask"])
        # Every word is read at one of its own first sub-words.
        assert [windows["word_ids"][row][token] for row, token in positions] == list(range(len(words)))

        if len(words) >= 2:
            head, tail = sorted(rng.sample(range(len(words)), 2))
            spans = {"start": head, "end": head + 1}, {"start": tail, "end": rng.randint(tail + 1, len(words))}
            max_length = rng.randint(6, 40)
            encoded = relation.encode_re([words], [spans[0]], [spans[1]], max_length=max_length)
            assert len(encoded["input_ids"][0]) <= max_length
            assert [encoded["input_ids"][0].count(marker) for marker in marker_ids] == [1, 1, 1, 1]


# ------------------------------------------------------------------------------------------------------------ pipelines


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz_images")
    good = folder / "good.png"
    Image.new("RGB", (12, 9), (200, 10, 10)).save(good)
    broken = folder / "broken.jpg"
    broken.write_bytes(b"\xff\xd8" + random.Random(0).randbytes(64))
    return {"good": str(good), "broken": str(broken), "missing": str(folder / "missing.png")}


def random_image(rng: random.Random, images: dict[str, str]):
    """`(image, culprit)`: a valid image (culprit None) or a bad one with the text its error must contain."""
    choice = rng.choice(["none", "path", "pil", "numpy", "broken", "missing", "number", "bytes"])
    return {
        "none": (None, None),
        "path": (images["good"], None),
        "pil": (Image.new(rng.choice(["RGB", "L", "RGBA", "P"]), (7, 5)), None),
        "numpy": (np.random.default_rng(rng.randrange(99)).integers(0, 255, (6, 4, 3), dtype=np.uint8), None),
        "broken": (images["broken"], "broken.jpg"),
        "missing": (images["missing"], "missing.png"),
        "number": (7, "'image'"),
        "bytes": (b"\x89PNG", "'image'"),
    }[choice]


def random_pipeline_input(rng: random.Random, task: str, images: dict[str, str]):
    """`(input, culprit)`: an input and, if it is bad, the text the error must contain."""
    words = random_words(rng, longest=rng.choice([4, 20, 120]))
    image, culprit = random_image(rng, images)
    example = {"words": words, "image": image}
    if task == "ner" and rng.random() < 0.4:
        example = {"text": rng.choice([" ", "\n"]).join(words), "image": image}
    if task == "re":
        head, tail = rng.randrange(len(words)), rng.randrange(len(words))
        example.update(head=(head, head + 1), tail={"start": tail, "end": tail + 1})
    damage_kind = rng.choice(["none"] * 5 + ["key", "words_string", "word_type", "objects", "top", "span"])
    if damage_kind == "key":
        example["img"], culprit = image, "'img'"
    elif damage_kind == "words_string":
        example["words"], culprit = " ".join(words), "'words'"
        example.pop("text", None)
    elif damage_kind == "word_type":
        example["words"], culprit = [*words, rng.choice([None, 3, 2.5, ["x"]])], f"'words'[{len(words)}]"
        example.pop("text", None)
    elif damage_kind == "objects":
        example["objects"], culprit = rng.choice([(images["good"], "objects"), ([images["good"], 5], "'objects'[1]")])
        example["image"] = None  # a bad image would be named first
    elif damage_kind == "top":
        example, culprit = rng.choice([(5, "int"), (2.5, "float"), (None, "NoneType")])
    elif damage_kind == "span" and task == "re":
        example["tail"], culprit = (len(words), len(words) + 2), "tail span"
        example["image"] = None
    return example, culprit


def check_result(task: str, example, result) -> None:
    if task == "re":
        assert set(result) == {"relation", "score"}
        return
    num_words = len(example["words"]) if "words" in example else len(example["text"].split())
    covered = [index for entity in result for index in range(entity["word_start"], entity["word_end"])]
    assert covered == sorted(set(covered)) and all(0 <= index < num_words for index in covered)


@pytest.mark.parametrize("task", ["ner", "re"])
def test_pipelines_on_random_and_damaged_inputs(task, models, images):
    rng = random.Random(f"pipeline-{task}")
    runner = pipeline(f"multimodal-{task}", model=str(models[task]))
    good, bad = [], []
    for _ in range(40):
        example, culprit = random_pipeline_input(rng, task, images)
        try:
            result = runner(example)
        except PIPELINE_ERRORS as error:
            assert culprit is not None, (example, error)
            assert culprit in str(error), (culprit, error)
            bad.append((example, culprit))
            continue
        assert culprit is None, (example, culprit, result)
        check_result(task, example, result)
        good.append((example, result))
    assert len(good) >= 5 and len(bad) >= 5  # both paths are exercised
    # In a list or a generator: the same results in the same order, at any batch size.
    examples, expected = [example for example, _ in good], [result for _, result in good]
    for batch_size in (1, 3):
        for given in (examples, iter(examples)):
            results = list(runner((example for example in given), batch_size=batch_size))
            assert len(results) == len(expected)
            for result, single in zip(results, expected, strict=True):
                scores = [item["score"] for item in (single if isinstance(single, list) else [single])]
                got = [item["score"] for item in (result if isinstance(result, list) else [result])]
                assert got == pytest.approx(scores, abs=1e-5)
    # A bad input among good ones: the error names its index and the culprit.
    for example, culprit in bad[:5]:
        position = rng.randrange(len(examples) + 1)
        with pytest.raises(PIPELINE_ERRORS, match=rf"input {position}: ") as raised:
            runner([*examples[:position], example, *examples[position:]], batch_size=rng.randint(1, 4))
        assert culprit in str(raised.value)
    # With the masking policy, broken and missing image files are masked: the text-only result.
    text_only = {"words": ["a", "b"], **({"head": (0, 1), "tail": (1, 2)} if task == "re" else {})}
    for name in ("broken", "missing"):
        assert runner({**text_only, "image": images[name]}, missing_images="mask") == runner(text_only)
