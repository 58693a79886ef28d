"""The prediction files: CoNLL columns for NER, one JSON object per line for RE (end to end in test_predict.py); the
data's labels on a model's ids."""

import json

import pytest
from datasets import ClassLabel, Dataset, Features, List

from hvpnet_hf.loading import labels_on_model_ids
from hvpnet_hf.prediction_files import conll_row, write_ner_predictions, write_re_predictions


def test_conll_rows_always_have_three_columns():
    assert conll_row("Liverpool", "B-LOC", "B-ORG") == "Liverpool B-LOC B-ORG\n"
    assert conll_row("New York", "B-LOC", "O") == "New_York B-LOC O\n"
    assert conll_row(" \t", "O", "O") == "_ O O\n"


def test_ner_file_has_a_blank_line_after_each_sentence(tmp_path):
    path = tmp_path / "predictions.txt"
    write_ner_predictions(path, [(["Hi", "Bob"], ["O", "B-PER"], ["O", "O"]), (["x"], ["O"], ["B-MISC"])])
    assert path.read_text(encoding="utf-8") == "Hi O O\nBob B-PER O\n\nx O B-MISC\n\n"
    with pytest.raises(ValueError):  # a sentence whose columns differ in length is an error, and nothing is written
        write_ner_predictions(tmp_path / "broken.txt", [(["Hi", "Bob"], ["O"], ["O", "O"])])
    assert not (tmp_path / "broken.txt").exists()


def test_re_file_holds_one_record_per_example(tmp_path):
    path = tmp_path / "predictions.jsonl"
    examples = [{"id": "0", "head": {"name": "Alice", "start": 0, "end": 1}, "tail": {"name": "Zürich"}}]
    ranked = [[{"relation": "/per/loc/place_of_residence", "score": 0.812345}, {"relation": "None", "score": 0.1}]]
    write_re_predictions(path, examples, ["None"], ranked, top_k=True)
    (line,) = path.read_text(encoding="utf-8").splitlines()
    assert "Zürich" in line  # written as UTF-8, not escaped
    assert json.loads(line) == {
        **examples[0],
        "gold": "None",
        "predicted": "/per/loc/place_of_residence",
        "score": 0.8123,
        "top_k": [{"relation": "/per/loc/place_of_residence", "score": 0.8123}, {"relation": "None", "score": 0.1}],
    }
    write_re_predictions(path, examples, ["None"], ranked, top_k=False)
    assert "top_k" not in json.loads(path.read_text(encoding="utf-8"))


def test_labels_are_put_on_the_models_ids_by_name():
    tags = Features({"tags": List(ClassLabel(names=["O", "B-PER", "I-PER", "B-LOC"]))})
    examples = Dataset.from_dict({"tags": [[1, 2, 0], [3]]}, features=tags, split="test")
    model_labels = {0: "B-LOC", 1: "I-PER", 2: "B-PER", 3: "O", 4: "B-ORG"}
    on_model = labels_on_model_ids(examples, "tags", model_labels, "tagger")
    assert on_model["tags"] == [[2, 1, 3], [0]]
    assert on_model.features["tags"].feature.names == ["B-LOC", "I-PER", "B-PER", "O", "B-ORG"]
    relation = Features({"relation": ClassLabel(names=["None", "/per/per/peer", "/org/org/subsidiary"])})
    pairs = Dataset.from_dict({"relation": [0, 1, 2]}, features=relation, split="test")
    on_model = labels_on_model_ids(pairs, "relation", {0: "/per/per/peer", 1: "/org/org/subsidiary", 2: "None"}, "re")
    assert on_model["relation"] == [2, 0, 1]
    with pytest.raises(ValueError, match="the test split has labels \\['/org/org/subsidiary'\\] that the model re"):
        labels_on_model_ids(pairs, "relation", {0: "None", 1: "/per/per/peer"}, "re")
    # A label the data names but never uses is no obstacle.
    assert labels_on_model_ids(pairs.select([0, 1]), "relation", {0: "/per/per/peer", 1: "None"}, "re")[
        "relation"
    ] == [1, 0]
