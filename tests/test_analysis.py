"""The analysis commands (hvpnet_hf.analysis) on tiny models and the bundled sample data."""

import argparse
import ast
import json
import statistics
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image
from test_examples import load_script, text_model, tiny_flags  # noqa: F401  (text_model is a fixture)
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

import hvpnet_hf
from hvpnet_hf import sample_subset
from hvpnet_hf.analysis import ablations, attention, cross_task, gates, low_resource, robustness, runs, seeds
from hvpnet_hf.analysis.data import load_examples, load_model

CONFIG = str(runs.EXAMPLES_DIR / "configs" / "tiny_mner.yaml")
RE_CONFIG = str(runs.EXAMPLES_DIR / "configs" / "tiny_mre.yaml")


def run_flags(text_model_path: str, folder: Path, **overrides: str) -> list[str]:
    """The tiny runs of test_examples, without their output folder (the analyses choose it); their feature cache is
    kept in `folder`."""
    flags = tiny_flags(text_model_path, folder)
    del flags[flags.index("--output_dir") : flags.index("--output_dir") + 2]
    for name, value in overrides.items():
        if f"--{name}" in flags:
            flags[flags.index(f"--{name}") + 1] = value
        else:
            flags += [f"--{name}", value]
    return flags


@pytest.fixture(scope="module")
def seed_report(text_model, tmp_path_factory):  # noqa: F811
    """Two seeds of a tiny NER run (their models serve the later tests)."""
    output_dir = tmp_path_factory.mktemp("seeds")
    flags = run_flags(text_model, output_dir)
    report = seeds.main([CONFIG, "--seeds", "3", "5", "--output_dir", str(output_dir), *flags])
    return output_dir, flags, report


@pytest.fixture(scope="module")
def trained_model(seed_report) -> str:
    return str(seed_report[0] / "seed-3")


def test_seeds_aggregate_every_run_and_resume(seed_report, monkeypatch):
    output_dir, flags, report = seed_report
    per_seed = {seed: json.loads((output_dir / f"seed-{seed}" / "all_results.json").read_text()) for seed in (3, 5)}
    # Each run used its own seed: the two models differ.
    first, second = (AutoModelForTokenClassification.from_pretrained(output_dir / f"seed-{s}") for s in (3, 5))
    assert not torch.equal(first.classifier.weight, second.classifier.weight)
    for prefix, split in runs.SPLITS.items():
        values = [per_seed[seed][f"{prefix}_f1"] for seed in (3, 5)]
        assert report["summary"][split]["f1"]["mean"] == pytest.approx(np.mean(values))
        assert report["summary"][split]["f1"]["std"] == pytest.approx(statistics.stdev(values))
    written = json.loads((output_dir / "seeds.json").read_text())
    assert written["summary"] == json.loads(json.dumps(report["summary"]))
    table = (output_dir / "seeds.md").read_text()
    assert "| seed 3 |" in table and "| seed 5 |" in table and "mean ± std (2 seeds)" in table
    assert f"{100 * per_seed[5]['test_f1']:.2f}" in table

    # Resuming: finished seeds are read back; only the seed without results runs.
    started = []
    monkeypatch.setattr(runs, "load_script", lambda task: type("Script", (), {"main": started.append}))
    again = seeds.main([CONFIG, "--seeds", "3", "5", "--output_dir", str(output_dir), *flags])
    assert started == [] and again["summary"] == report["summary"]
    with pytest.raises(RuntimeError, match="lacks eval_f1 or test_f1"):
        seeds.main([CONFIG, "--seeds", "7", "--output_dir", str(output_dir), *flags])
    assert len(started) == 1 and started[0][-4:] == ["--seed", "7", "--output_dir", str(output_dir / "seed-7")]


def test_ablation_variants_set_the_switches_of_table_1(seed_report, tmp_path):
    # Every variant's flags, parsed by the training script, give the model switch the paper's row names.
    run_mner = load_script("run_mner")
    expected = {
        "no_visual_prefix": ("use_visual_prefix", False),
        "images_masked": ("mask_images", True),
        "flat": ("prefix_mode", "flat"),
        "one_to_three": ("prefix_mode", "one_to_three"),
        "only_obj": ("use_global_image", False),
        "pyramid": ("prefix_mode", "pyramid"),
    }
    assert set(expected) == set(ablations.VARIANTS)
    for name, (setting, value) in expected.items():
        model_args, data_args, _ = run_mner.parse_arguments([CONFIG, *ablations.VARIANTS[name][1]])
        assert getattr(model_args, setting, getattr(data_args, setting, None)) == value, name

    # One variant trained for real; a finished pyramid run (the seeds fixture's) is read back, not run again.
    (tmp_path / "pyramid").mkdir()
    (tmp_path / "pyramid" / "seed-3").symlink_to(seed_report[0] / "seed-3")
    flags = [CONFIG, "--variants", "only_obj", "pyramid", "--seeds", "3", "--output_dir", str(tmp_path)]
    report = ablations.main([*flags, *seed_report[1]])
    assert json.loads((tmp_path / "only_obj" / "seed-3" / "config.json").read_text())["use_global_image"] is False
    rows = [line for line in (tmp_path / "ablations.md").read_text().splitlines() if line.startswith("| HVPNeT")]
    assert [row.split(" | ")[0] for row in rows] == ["| HVPNeT-OnlyObj", "| HVPNeT"]
    for row, name in zip(rows, ("only_obj", "pyramid"), strict=True):
        assert row.split(" | ")[-1] == f"{100 * report['variants'][name]['runs'][3]['test_f1']:.2f} |"


def test_sample_subsets_of_one_seed_are_nested():
    dataset = Dataset.from_dict({"id": list(range(300))})
    for seed in (1, 49, 1234):
        subsets = [set(sample_subset(dataset, ratio, seed=seed)["id"]) for ratio in low_resource.PAPER_RATIOS]
        assert [len(subset) for subset in subsets] == [15, 30, 60, 150]
        assert all(small < large for small, large in zip(subsets, subsets[1:], strict=False))


def test_low_resource_trains_on_each_fraction_and_plots(text_model, tmp_path):  # noqa: F811
    flags = run_flags(text_model, tmp_path)
    del flags[flags.index("--max_train_samples") : flags.index("--max_train_samples") + 2]
    report = low_resource.main(
        [CONFIG, "--ratios", "0.1", "0.05", "--seeds", "2", "--output_dir", str(tmp_path), *flags]
    )
    for model in ("image-aware", "text-only (images masked)"):
        sizes = {ratio: entry["train_samples"] for ratio, entry in report["models"][model]["ratios"].items()}
        assert sizes == {0.05: [15], 0.1: [30]}  # 5% and 10% of the 300 training tweets
    config = json.loads((tmp_path / "text_only" / "ratio-0.05" / "seed-2" / "all_results.json").read_text())
    assert "test_f1" in config
    table = (tmp_path / "low_resource.md").read_text().splitlines()
    assert [line.split(" | ")[0] for line in table[2:]] == ["| 5%", "| 10%"]
    with Image.open(tmp_path / "low_resource.png") as image:
        assert image.size[0] > 300 and image.size[1] > 200


def test_cross_task_loads_the_encoder_and_builds_a_new_head(text_model, trained_model, tmp_path):  # noqa: F811
    flags = run_flags(text_model, tmp_path, max_seq_length="40")
    report = cross_task.main(
        [RE_CONFIG, "--task", "re", "--source", trained_model, "--seeds", "1", "--output_dir", str(tmp_path), *flags]
    )
    transfer = report["transfer"]
    assert any(name.startswith("hvpnet.visual_encoder.gate") for name in transfer["loaded"])
    assert any(name.startswith("hvpnet.text_model.encoder.layer.1.") for name in transfer["loaded"])
    assert transfer["new"] and all(not name.startswith("hvpnet.") for name in transfer["new"])
    assert {name.split(".")[0] for name in transfer["unused"]} == {"classifier", "crf"}  # the NER head
    assert transfer["partly_loaded"] == [
        "hvpnet.text_model.embeddings.word_embeddings.weight (first 30522 of 30526 rows)"
    ]

    # The start of the transferred run holds the source's encoder weights and a head of the new task's size.
    source = AutoModelForTokenClassification.from_pretrained(trained_model)
    start = AutoModelForSequenceClassification.from_pretrained(tmp_path / "transferred_start" / "seed-1")
    for name in (
        "hvpnet.visual_encoder.key_value_weight",
        "hvpnet.text_model.encoder.layer.0.attention.self.query.weight",
    ):
        assert torch.equal(source.get_parameter(name), start.get_parameter(name))
    assert start.config.num_labels == len(start.config.id2label) > 2
    table = (tmp_path / "cross_task.md").read_text()
    assert f"{100 * report['runs']['transferred'][1]['test_f1']:.2f}" in table


def test_robustness_scores_real_images_as_the_training_run_did(trained_model, seed_report, tmp_path):
    scores = robustness.main(["--model", trained_model, "--max_samples", "10", "--output_dir", str(tmp_path)])
    run_results = json.loads((seed_report[0] / "seed-3" / "all_results.json").read_text())
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
    load_script("run_mre").main([*tiny_flags(text_model, model_dir), "--max_seq_length", "40"])
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


@pytest.mark.parametrize("task, script", [("ner", "run_mner"), ("re", "run_mre")])
def test_sample_splits_have_the_images_the_training_script_loads(task, script):
    module = load_script(script)
    _, data_args, _ = module.parse_arguments(["--dataset", "sample", "--output_dir", "unused"])
    loaded_by_script = module.load_raw_datasets(data_args)
    for split in ("validation", "test"):
        examples = load_examples(task, argparse.Namespace(data_file=None, split=split, max_samples=None))
        assert examples["tokens"] == loaded_by_script[split]["tokens"]
        assert examples["image"] == loaded_by_script[split]["image"]
        assert examples["objects"] == loaded_by_script[split]["objects"]
        assert sum(image is not None for image in examples["image"]) > 0.9 * len(examples)


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
