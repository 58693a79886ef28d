"""Data sets of a user's own (`hvpnet_hf.data_sources`): JSON lines, CSV, Parquet and saved data sets, normalized into
the loaders' columns, and the errors that name what is wrong."""

import json
import logging

import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Value
from PIL import Image

from hvpnet_hf.data_sources import is_table_file, load_table_dataset, stream_table_dataset

NER_COLUMNS = {"tokens": "tokens", "ner_tags": "ner_tags", "image": "image", "objects": "objects"}
RE_COLUMNS = {"tokens": "tokens", "head": "head", "tail": "tail", "relation": "relation", "image": "image",
              "objects": "objects"}  # fmt: skip


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture
def picture(tmp_path):
    (tmp_path / "pictures").mkdir()
    Image.new("RGB", (20, 10), "red").save(tmp_path / "pictures" / "a.jpg")
    return "pictures/a.jpg"


def test_the_extension_tells_a_table_from_a_release_file():
    assert [is_table_file(name) for name in ("a.jsonl", "b.JSON", "c.csv", "d.parquet")] == [True] * 4
    assert not any(is_table_file(name) for name in ("train.txt", "mnre_val .txt", "valid"))


def test_relative_images_resolve_against_the_data_file_and_missing_ones_are_masked(tmp_path, picture, caplog):
    rows = [
        {"tokens": ["Kevin", "in", "Boston"], "ner_tags": ["B-PER", "O", "B-LOC"], "image": picture,
         "objects": [picture, "pictures/gone.jpg"]},
        {"tokens": ["hi"], "ner_tags": ["O"], "image": "pictures/gone.jpg", "objects": []},
        {"tokens": ["text", "only"], "ner_tags": ["O", "O"], "image": None, "objects": []},
    ]  # fmt: skip
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    with caplog.at_level(logging.WARNING, "hvpnet_hf.data_sources"):
        split = load_table_dataset("ner", NER_COLUMNS, data_files={"train": train})["train"]
    image = str(tmp_path / picture)
    assert split["image"] == [image, None, None] and split["objects"] == [[image, None], [], []]
    assert split.features["ner_tags"].feature.names == ["O", "B-LOC", "B-PER"]  # the neutral tag first
    assert split["ner_tags"][0] == [2, 0, 1] and split["id"] == ["0", "1", "2"]
    assert "column 'image': 1 of 2 images missing" in caplog.text  # the text-only row gave none
    with pytest.raises(FileNotFoundError, match="row 0, column 'objects': image .*gone.jpg is missing"):
        load_table_dataset("ner", NER_COLUMNS, data_files={"train": train}, missing_images="error")


def test_a_column_without_one_image_found_is_an_error(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"tokens": ["a"], "ner_tags": ["O"], "image": "nowhere.jpg"}])
    with pytest.raises(FileNotFoundError, match="none of the 1 images of column 'image' of the train split"):
        load_table_dataset("ner", NER_COLUMNS, data_files={"train": train}, text_only="use --mask_images")
    masked = load_table_dataset("ner", NER_COLUMNS, data_files={"train": train}, mask_images=True)["train"]
    assert masked["image"] == [None]


def test_a_tag_outside_the_label_set_names_the_split_row_and_tag(tmp_path):
    files = {
        "train": write_jsonl(tmp_path / "train.jsonl", [{"tokens": ["Paris", "!"], "ner_tags": ["B-LOC", "O"]}]),
        "validation": write_jsonl(tmp_path / "dev.jsonl", [{"tokens": ["a"], "ner_tags": ["O"]}] * 2
                                  + [{"tokens": ["Bob"], "ner_tags": ["B-PER"]}]),
    }  # fmt: skip
    with pytest.raises(ValueError, match=r"the validation split, row 2, column 'ner_tags': label 'B-PER' is not in"):
        load_table_dataset("ner", NER_COLUMNS, data_files=files)
    # Without a train split, a trained model's labels are the label set.
    del files["train"]
    splits = load_table_dataset("ner", NER_COLUMNS, data_files=files, label_names=["O", "B-PER", "I-PER"])
    assert splits["validation"]["ner_tags"] == [[0], [0], [1]]


def test_class_labels_relations_and_entity_spans(tmp_path, picture):
    features = Features({"tokens": List(Value("string")), "head": {"start": Value("int32"), "end": Value("int32")},
                         "tail": {"name": Value("string"), "pos": List(Value("int32"))},
                         "relation": ClassLabel(names=["None", "/per/per/peer"])})  # fmt: skip
    rows = [{"tokens": ["Ann", "met", "Bob"], "head": {"start": 0, "end": 1}, "tail": {"name": "Bob", "pos": [2, 3]},
             "relation": 1}]  # fmt: skip
    DatasetDict(test=Dataset.from_list(rows, features=features)).save_to_disk(tmp_path / "pairs")
    split = load_table_dataset("re", RE_COLUMNS, dataset_name=str(tmp_path / "pairs"))["test"]
    assert split[0]["head"] == {"name": "Ann", "start": 0, "end": 1} and split[0]["relation"] == 1
    assert split.features["relation"].names == ["None", "/per/per/peer"] and split[0]["image"] is None

    rows[0]["tail"] = {"start": 2, "end": 4}
    write_jsonl(tmp_path / "test.jsonl", [{**rows[0], "relation": "/per/per/peer"}])
    with pytest.raises(ValueError, match=r"the test split, row 0, column 'tail': span \[2, 4\) is out of range"):
        load_table_dataset("re", RE_COLUMNS, data_files={"test": tmp_path / "test.jsonl"}, label_names=["None"])


def test_urls_and_missing_columns_are_refused_before_any_work(tmp_path):
    rows = [{"words": ["a"], "ner_tags": ["O"], "image": "https://example.com/a.jpg"}]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(ValueError, match=r"no column 'tokens' \(--text_column_name\); its columns are \['words'"):
        load_table_dataset("ner", NER_COLUMNS, data_files={"train": train})
    with pytest.raises(ValueError, match="row 0, column 'image' is a URL .*https://example.com/a.jpg"):
        load_table_dataset("ner", {**NER_COLUMNS, "tokens": "words"}, data_files={"train": train})
    # A column named by its user must be there; the default image columns may be absent (text only).
    with pytest.raises(ValueError, match=r"no column 'crops' \(--objects_column_name\)"):
        load_table_dataset("ner", {**NER_COLUMNS, "tokens": "words", "objects": "crops"}, data_files={"train": train})


def test_data_files_of_mixed_or_unknown_formats_are_refused(tmp_path):
    with pytest.raises(ValueError, match="data files must all be one of"):
        load_table_dataset("ner", NER_COLUMNS, data_files={"train": tmp_path / "a.jsonl", "test": tmp_path / "b.csv"})


@pytest.mark.parametrize("read", [load_table_dataset, stream_table_dataset])
def test_an_empty_data_file_is_refused_by_name(tmp_path, read):
    (tmp_path / "train.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match=r"without a single row: train: .*train\.jsonl"):
        read("ner", NER_COLUMNS, data_files={"train": tmp_path / "train.jsonl"})


def test_streamed_rows_are_normalized_as_in_memory_and_images_counted_once_per_row(tmp_path, picture, caplog):
    rows = [
        {"tokens": ["Kevin", "in", "Boston"], "ner_tags": ["B-PER", "O", "B-LOC"], "image": picture,
         "objects": [picture, "pictures/gone.jpg"]},
        {"tokens": ["hi"], "ner_tags": ["O"], "image": "pictures/gone.jpg", "objects": []},
    ]  # fmt: skip
    files = {"train": write_jsonl(tmp_path / "train.jsonl", rows)}
    in_memory = load_table_dataset("ner", NER_COLUMNS, data_files=files)["train"]
    with pytest.raises(ValueError, match="streaming reads no split ahead to find the label set"):
        stream_table_dataset("ner", NER_COLUMNS, data_files=files)
    splits, counts = stream_table_dataset("ner", NER_COLUMNS, data_files=files, label_names=["O", "B-LOC", "B-PER"])
    assert list(splits["train"]) == list(in_memory) == list(splits["train"])  # read twice, as two epochs do
    with caplog.at_level(logging.WARNING, "hvpnet_hf.data_sources"):
        counts.report("use --mask_images")
    assert "column 'image': 1 of 2 images missing" in caplog.text  # counted once, though read twice
    assert "column 'objects': 1 of 2 images missing" in caplog.text
    # A label outside the given set is found when its row is read, and named.
    splits, _ = stream_table_dataset("ner", NER_COLUMNS, data_files=files, label_names=["O", "B-PER"])
    with pytest.raises(ValueError, match=r"the train split, row 0, column 'ner_tags': label 'B-LOC' is not in"):
        list(splits["train"])


def test_streamed_class_label_ids_are_read_by_name_onto_the_given_label_set(tmp_path):
    features = Features({"tokens": List(Value("string")), "ner_tags": List(ClassLabel(names=["O", "B-PER"]))})
    DatasetDict(train=Dataset.from_list([{"tokens": ["Bob"], "ner_tags": [1]}], features=features)).save_to_disk(
        tmp_path / "posts"
    )
    splits, _ = stream_table_dataset("ner", NER_COLUMNS, dataset_name=str(tmp_path / "posts"))
    assert [row["ner_tags"] for row in splits["train"]] == [[1]]  # the ClassLabel's own set
    splits, _ = stream_table_dataset(
        "ner", NER_COLUMNS, dataset_name=str(tmp_path / "posts"), label_names=["O", "B-LOC", "B-PER"]
    )  # a trained model's labels, in its order
    assert [row["ner_tags"] for row in splits["train"]] == [[2]]
    assert splits["train"].features["ner_tags"].feature.names == ["O", "B-LOC", "B-PER"]
