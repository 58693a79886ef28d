"""The analyses of a trained model (hvpnet_hf.analysis) on tiny models and the bundled sample data."""

import argparse
import ast
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from cmner_fixtures import write_cmner
from datasets import Dataset
from PIL import Image
from test_examples import (  # noqa: F401  (text_model is a fixture)
    model_predicting_one_label,
    run_mner,
    run_mre,
    text_model,
    tiny_flags,
)
from transformers import AutoModelForSequenceClassification

import hvpnet_hf
from hvpnet_hf.analysis import attention, gates, robustness
from hvpnet_hf.analysis.data import load_examples, load_model
from hvpnet_hf.analysis.plotting import pyplot
from hvpnet_hf.sample_data import sample_paths


@pytest.fixture(scope="module")
def trained_model(text_model, tmp_path_factory) -> str:  # noqa: F811
    """A tiny NER model trained for one short epoch by examples/run_mner.py."""
    output_dir = tmp_path_factory.mktemp("trained_ner")
    run_mner.main(tiny_flags(text_model, output_dir))
    return str(output_dir)


def test_robustness_scores_real_images_as_the_training_run_did(trained_model, tmp_path):
    scores = robustness.main(["--model", trained_model, "--max_samples", "10", "--output_dir", str(tmp_path)])
    run_results = json.loads((Path(trained_model) / "all_results.json").read_text())
    # The same model on the same 10 test tweets (--max_predict_samples 10): the F1 of the script's evaluation.
    assert scores["real images"]["f1"] == pytest.approx(run_results["test_f1"], abs=1e-9)
    assert set(scores) == {
        "real images",
        "images shuffled across examples",
        "blank images",
        "images masked (text only)",
    }
    assert "| images masked (text only) |" in (tmp_path / "robustness.md").read_text()


def test_robustness_scores_relations_by_micro_f1_without_none(text_model, tmp_path):  # noqa: F811
    model_dir = tmp_path / "mre"
    run_mre.main([*tiny_flags(text_model, model_dir), "--max_seq_length", "40"])
    # The model is made to answer the most frequent real relation of the 10 test examples whatever it reads, so
    # every condition has the same, hand-computed score.
    examples = load_examples("re", argparse.Namespace(data_file=None, split="test", max_samples=10))
    gold = [examples.features["relation"].int2str(relation) for relation in examples["relation"]]
    answer = Counter(relation for relation in gold if relation != "None").most_common(1)[0][0]
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    with torch.no_grad():
        model.classifier.bias[model.config.label2id[answer]] = 1e4
    model.save_pretrained(model_dir)

    scores = robustness.main(["--model", str(model_dir), "--max_samples", "10", "--output_dir", str(tmp_path)])
    hits = gold.count(answer)
    precision, recall = hits / len(gold), hits / sum(relation != "None" for relation in gold)
    assert 0 < precision < 1
    for condition in scores.values():
        assert condition["precision"] == pytest.approx(precision)
        assert condition["recall"] == pytest.approx(recall)
        assert condition["f1"] == pytest.approx(2 * precision * recall / (precision + recall))
    report = json.loads((tmp_path / "robustness.json").read_text())
    assert report["examples"] == 10 and set(report["scores"]) == set(scores)


class SplitsLoaded(Exception):
    """Stops a training script once it has loaded its splits (the exception's argument)."""


def stop_at_the_loaded_splits(splits, *args):
    raise SplitsLoaded(splits)


@pytest.mark.parametrize("task, module", [("ner", run_mner), ("re", run_mre)])
def test_sample_splits_have_the_images_the_training_script_loads(task, module, tmp_path, monkeypatch):
    monkeypatch.setattr(
        "hvpnet_hf.script_utils.select_splits", stop_at_the_loaded_splits
    )  # where load_splits calls it
    with pytest.raises(SplitsLoaded) as loaded:
        module.main(["--dataset", "sample", "--do_train", "false", "--output_dir", str(tmp_path)])
    loaded_by_script = loaded.value.args[0]
    for split in ("validation", "test"):
        examples = load_examples(task, argparse.Namespace(data_file=None, split=split, max_samples=None))
        assert examples["tokens"] == loaded_by_script[split]["tokens"]
        assert examples["image"] == loaded_by_script[split]["image"]
        assert examples["objects"] == loaded_by_script[split]["objects"]
        assert sum(image is not None for image in examples["image"]) > 0.9 * len(examples)


@pytest.mark.parametrize("task, file_name", [("ner", "test.txt"), ("re", "mnre_test.txt")])
def test_a_data_file_is_read_with_the_folders_of_its_split_as_hvpnet_predict_reads_it(task, file_name, tmp_path):
    sample = sample_paths(task)
    data_file = f"{sample['data_dir']}/{file_name}"
    roots = {"image_dir": sample["image_dir"], "object_dir": sample["object_dir"]}  # the release's roots
    args = argparse.Namespace(
        data_file=data_file, **roots, object_map=None, rel2id=sample.get("rel2id"), max_samples=None
    )
    examples = load_examples(task, args)
    # The images, crops and crop map of the test split, as the sample set's own test split has them.
    sample_test = load_examples(task, argparse.Namespace(data_file=None, split="test", max_samples=None))
    assert examples["image"] == sample_test["image"] and examples["objects"] == sample_test["objects"]
    assert any(examples["objects"]) and sum(image is not None for image in examples["image"]) > 0.9 * len(examples)
    # A folder that holds none of the file's images is refused.
    args.image_dir, args.object_dir = str(tmp_path), None
    with pytest.raises(FileNotFoundError, match=f"none of the .* of --data_file {data_file} was found in --image_dir"):
        load_examples(task, args)


def test_a_cmner_data_file_is_read_with_the_pictures_of_its_posts(tmp_path):
    text_dir, image_dir = write_cmner(tmp_path)
    data_file = text_dir / "dev.txt"
    args = argparse.Namespace(
        data_file=str(data_file), image_dir=str(image_dir), object_dir=None, object_map=None, max_samples=None
    )
    examples = load_examples("ner", args)
    assert examples["tokens"] == [list("李娜去上海")]  # one character a word
    assert examples["image"] == [[str(image_dir / "Mn78Op_1.jpg"), str(image_dir / "Mn78Op_2.jpg")]]
    args.image_dir = str(tmp_path)  # a folder that holds none of the posts' pictures is refused
    with pytest.raises(FileNotFoundError, match=rf"none of the 1 images of --data_file {data_file} .*Mn78Op_\*\.jpg"):
        load_examples("ner", args)
    args.rel2id = None  # a relation model does not read NER posts
    with pytest.raises(ValueError, match=f"--data_file {data_file} is a cmner file, not data of the re model"):
        load_examples("re", args)


def test_shuffled_images_come_from_other_examples():
    source = robustness.derangement(50, seed=0)
    assert sorted(source.tolist()) == list(range(50)) and not np.any(source == np.arange(50))
    assert np.array_equal(source, robustness.derangement(50, seed=0))
    examples = Dataset.from_dict(
        {"image": [f"{i}.jpg" for i in range(5)], "objects": [[f"{i}c.jpg"] for i in range(5)]}
    )
    shuffled = robustness.shuffle_images(examples, seed=1)
    for image, objects in zip(shuffled["image"], shuffled["objects"], strict=True):
        assert objects == [image.replace(".jpg", "c.jpg")]  # an example's image and crops move together
    assert all(a != b for a, b in zip(shuffled["image"], examples["image"], strict=True))


def test_gates_average_over_present_images_only(trained_model, tmp_path):
    flags = ["--model", trained_model, "--split", "validation", "--max_samples", "30", "--output_dir", str(tmp_path)]
    result = gates.main(flags)
    _, _, model = load_model(trained_model)
    examples = load_examples("ner", argparse.Namespace(data_file=None, split="validation", max_samples=30))
    num_crops = sum(crop is not None for row in examples for crop in row["objects"][:2])  # the model takes 2 crops
    assert result["object crops"]["images"] == num_crops
    assert result["global image"]["images"] == sum(row["image"] is not None for row in examples)
    for group in ("global image", "object crops"):
        weights = torch.tensor(result[group]["mean"])
        assert weights.shape == (model.config.text_config.num_hidden_layers, 4)
        # A softmax over stages per image: averaging absent (all-zero) rows in would make the rows sum below 1.
        torch.testing.assert_close(weights.sum(-1), torch.ones(len(weights)))
    with Image.open(tmp_path / "gates.png") as image:
        assert image.size[0] > 300
    assert "| layer | stage 1 | stage 2 | stage 3 | stage 4 |" in (tmp_path / "gates.md").read_text()


def test_gates_figure_has_a_panel_per_image_group_with_images():
    means = {
        "global image": {"mean": [[0.1, 0.9], [0.6, 0.4], [0.3, 0.7]], "images": 2},
        "object crops": {"mean": None, "images": 0},
    }
    figure = gates.figure(means)
    panels = [axis for axis in figure.axes if axis.get_title()]  # the color bar has no title
    assert [axis.get_title() for axis in panels] == ["global image (2)"]
    assert [text.get_text() for text in panels[0].texts] == ["0.10", "0.90", "0.60", "0.40", "0.30", "0.70"]
    pyplot().close(figure)


def test_entity_attention_covers_every_image_slot(trained_model, tmp_path):
    result = attention.main(["--model", trained_model, "--output_dir", str(tmp_path)])
    assert result["entities"] and len(result["layers"]) == 2
    assert [slot["name"] for slot in result["slots"]] == ["global image", "crop 1", "crop 2"]
    for layer in result["layers"]:
        masses = attention.slot_masses(result, layer)
        for entity_masses, text_mass in zip(masses, layer["text"], strict=True):
            # Each entity's attention over the prefix and the text is one distribution.
            assert sum(entity_masses) + text_mass == pytest.approx(1.0, abs=1e-5)
        for slot_index, slot in enumerate(result["slots"]):
            if not slot["present"]:
                assert all(row[slot_index] == 0 for row in masses)
    with Image.open(tmp_path / "attention.png") as image:
        assert image.size[0] > 300


def test_only_the_plotting_helper_imports_matplotlib():
    package = Path(hvpnet_hf.__file__).parent
    importing = [
        path.relative_to(package).as_posix()
        for path in package.rglob("*.py")
        if any(
            isinstance(node, (ast.Import, ast.ImportFrom))
            and any(
                "matplotlib" in name for name in [getattr(node, "module", None) or ""] + [a.name for a in node.names]
            )
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        )
    ]
    assert importing == ["analysis/plotting.py"]
    # ... and it does so only when a figure is drawn, not when imported.
    plotting = ast.parse((package / "analysis" / "plotting.py").read_text(encoding="utf-8"))
    assert not any(
        isinstance(node, (ast.Import, ast.ImportFrom)) and "matplotlib" in ast.unparse(node) for node in plotting.body
    )


@pytest.mark.parametrize("module", [attention, gates, robustness])
def test_help_gives_the_whole_description(module, capsys):
    with pytest.raises(SystemExit):
        module.main(["--help"])
    assert " ".join(module.__doc__.split()) in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("module", [attention, gates, robustness])
def test_arguments_are_checked_before_the_model_is_loaded(module, tmp_path, monkeypatch):
    monkeypatch.setattr(module, "load_model", lambda *args: pytest.fail("loaded the model"))
    taken = tmp_path / "taken"
    taken.write_text("a file")
    cases = [
        (["--output_dir", str(taken)], NotADirectoryError, "--output_dir .*taken: .*taken is a file"),
        (["--data_file", str(tmp_path / "absent.txt")], FileNotFoundError, "--data_file .*absent.txt is not a file"),
        (["--batch_size", "0"], ValueError, "--batch_size must be at least 1, got 0"),
        (["--max_samples", "0"], ValueError, "--max_samples must be at least 1, got 0"),
    ]
    for flags, error, message in cases:
        with pytest.raises(error, match=message):
            module.main(["--model", "unused", "--output_dir", str(tmp_path / "out"), *flags])


def test_robustness_reads_the_models_ids_with_its_own_label_names(text_model, tmp_path):  # noqa: F811
    # The model's relation ids run in another order than the sample set's; it answers one relation whatever it reads.
    examples = load_examples("re", argparse.Namespace(data_file=None, split="test", max_samples=10))
    names = list(reversed(examples.features["relation"].names))
    gold = [examples.features["relation"].int2str(relation) for relation in examples["relation"]]
    answer = Counter(relation for relation in gold if relation != "None").most_common(1)[0][0]
    model_dir = tmp_path / "mre"
    model_predicting_one_label("re", text_model, model_dir, names, answer)

    scores = robustness.main(["--model", str(model_dir), "--max_samples", "10", "--output_dir", str(tmp_path)])
    assert scores["real images"]["precision"] == pytest.approx(gold.count(answer) / len(gold))
