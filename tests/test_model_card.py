"""Model cards render from the templates with a run's results, settings and loading instructions."""

import importlib
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from huggingface_hub.utils import filter_repo_objects
from transformers import BertConfig, TrainingArguments

from hvpnet_hf import HVPNetConfig
from hvpnet_hf.model_card import push_output_dir_to_hub, render_model_card, training_hyperparameters
from hvpnet_hf.training import HVPNetTrainingArguments

TINY_TEXT = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)


def ner_config() -> HVPNetConfig:
    labels = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    return HVPNetConfig(
        text_config=TINY_TEXT,
        vision_backbone="test_resnet",
        id2label=dict(enumerate(labels)),
        label2id={label: index for index, label in enumerate(labels)},
    )


def test_ner_card_carries_results_settings_and_usage(tmp_path):
    args = TrainingArguments(
        output_dir=str(tmp_path),
        learning_rate=3e-5,
        per_device_train_batch_size=8,
        num_train_epochs=30,
        warmup_steps=0.1,
        weight_decay=0.01,
        metric_for_best_model="f1",
        report_to="none",
    )
    results = {"eval_f1": 0.7532, "eval_precision": 0.74, "eval_recall": 0.7667, "test_f1": 0.7412}
    card = render_model_card(
        "ner",
        ner_config(),
        results,
        "twitter2015",
        "bert-base-uncased",
        training_hyperparameters(args),
        "someone/hvpnet-twitter2015",
    )
    text = str(card)
    assert "| validation | 74.00 | 76.67 | 75.32 |" in text
    assert "| test | – | – | 74.12 |" in text
    assert "| learning rate | 3e-05 |" in text and "| epochs | 30 |" in text
    assert "| head learning rate (CRF and emissions / relation classifier) | 3e-05 |" in text  # none set: the same
    assert "| visual prefix learning rate | 3e-05 |" in text
    own_args = HVPNetTrainingArguments(
        output_dir=str(tmp_path), learning_rate=3e-5, head_learning_rate=5e-2, prefix_learning_rate=1e-3
    )
    assert training_hyperparameters(own_args)["head learning rate (CRF and emissions / relation classifier)"] == 5e-2
    assert training_hyperparameters(own_args)["visual prefix learning rate"] == 1e-3
    assert "| vision backbone | test_resnet (randomly initialized) |" in text
    assert (
        'AutoModelForTokenClassification.from_pretrained("someone/hvpnet-twitter2015", trust_remote_code=True)' in text
    )
    # Machine B's code: everything from the repository, nothing from hvpnet_hf.
    assert 'pipeline(model="someone/hvpnet-twitter2015", trust_remote_code=True)' in text
    assert 'AutoProcessor.from_pretrained("someone/hvpnet-twitter2015", trust_remote_code=True)' in text
    assert "import hvpnet_hf" not in text.split("With `hvpnet_hf` installed")[0]
    assert "Entity types: LOC, PER." in text and "@inproceedings{chen-etal-2022-good" in text
    # The metadata is valid Hub card metadata and survives a save/load round trip.
    card.save(tmp_path / "README.md")
    data = ModelCard.load(tmp_path / "README.md").data
    assert data.pipeline_tag == "token-classification" and data.datasets == ["twitter2015"]
    assert data.base_model == "bert-base-uncased"
    assert [result.metric_value for result in data.eval_results] == [0.7532, 0.7412]
    assert [result.dataset_split for result in data.eval_results] == ["validation", "test"]


def test_re_card_lists_relations_and_note():
    relations = ["None", "/per/per/peer", "/per/loc/place_of_residence"]
    config = HVPNetConfig(
        text_config=TINY_TEXT,
        vision_backbone="test_resnet",
        id2label=dict(enumerate(relations)),
        relation_pooling="cls",
    )
    card = render_model_card(
        "re", config, {"eval_f1": 0.5}, "mnre", "/local/bert", {}, "outputs/run", note="Trained on a toy set."
    )
    text = str(card)
    assert "Relations (3): `None`, `/per/per/peer`, `/per/loc/place_of_residence`." in text
    assert "> Trained on a toy set." in text and "| relation pooling | cls |" in text
    assert "| test |" not in text  # no test results were given
    assert card.data.base_model is None  # a local path is no Hub model


def test_card_needs_validation_results_and_a_known_task():
    with pytest.raises(ValueError, match="eval_f1"):
        render_model_card("ner", ner_config(), {"test_f1": 0.5}, "t", "m", {}, "x")
    with pytest.raises(ValueError, match="task must be one of"):
        render_model_card("pos", ner_config(), {"eval_f1": 0.5}, "t", "m", {}, "x")


class RecordingHubApi:
    """Stands in for `HfApi`: records the calls instead of uploading."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        return "https://hub.example/commit/1"


def test_push_uploads_the_model_folder_without_training_leftovers(tmp_path):
    published = [
        "config.json", "model.safetensors", "configuration_hvpnet.py", "modeling_hvpnet.py",
        "object_detection.py", "processing_hvpnet.py", "image_processing_hvpnet.py", "pipelines.py",
        "processor_config.json", "tokenizer.json", "tokenizer_config.json", "README.md", "all_results.json",
    ]  # fmt: skip
    leftovers = [
        "checkpoint-3/model.safetensors", "checkpoint-3/modeling_hvpnet.py", "checkpoint-3/config.json",
        "runs/events.out", "test_predictions.txt", "test_predictions.jsonl", "trainer_state.json",
        "training_args.bin", "train_results.json", "eval_results.json", "test_results.json",
    ]  # fmt: skip
    api = RecordingHubApi()
    push_output_dir_to_hub(tmp_path, "someone/hvpnet", private=True, api=api)
    (_, repo_id, create_kwargs), (_, _, upload_kwargs) = api.calls
    assert repo_id == "someone/hvpnet" and create_kwargs == {"private": True, "exist_ok": True}
    assert upload_kwargs["folder_path"] == str(tmp_path)
    uploaded = filter_repo_objects(
        published + leftovers,
        allow_patterns=upload_kwargs["allow_patterns"],
        ignore_patterns=upload_kwargs["ignore_patterns"],
    )
    assert list(uploaded) == published


GMNER_RESULTS = {
    "validation_candidate_recall": 0.9032,
    "validation_model_gmner_f1": 0.7807,
    "validation_model_mner_f1": 0.9947,
    "validation_model_eeg_f1": 0.7807,
    "validation_none_gmner_f1": 0.3422,
    "validation_largest_gmner_f1": 0.4278,
    "validation_first_gmner_f1": 0.4064,
    "test_candidate_recall": 0.9118,
    "test_model_gmner_f1": 0.7188,
}


def test_gmner_card_shows_the_three_scores_the_baselines_and_candidate_recall():
    config = ner_config()
    config.num_object_images = 16
    card = render_model_card(
        "gmner", config, GMNER_RESULTS, "twitter_gmner", "bert-base-uncased", {}, "someone/hvpnet-gmner"
    )
    text = str(card)
    assert "| validation | 90.32 | 78.07 | 99.47 | 78.07 | 34.22 | 42.78 | 40.64 |" in text
    assert "| test | 91.18 | 71.88 | – | – | – | – | – |" in text
    assert (
        'AutoModelForZeroShotObjectDetection.from_pretrained("someone/hvpnet-gmner", trust_remote_code=True)' in text
    )
    assert 'pipeline(model="someone/hvpnet-gmner", trust_remote_code=True)' in text
    assert "the model reads the first 16." in text and "Entity types: LOC, PER." in text
    assert "import hvpnet_hf" not in text.split("With `hvpnet_hf` installed")[0]
    assert [(result.dataset_split, result.metric_value) for result in card.data.eval_results] == [
        ("validation", 0.7807),
        ("test", 0.7188),
    ]
    assert card.data.eval_results[0].metric_name == "GMNER F1"
    with pytest.raises(ValueError, match="validation_model_gmner_f1"):
        render_model_card("gmner", config, {"test_model_gmner_f1": 0.5}, "t", "m", {}, "x")


def test_run_gmner_publishes_the_model_with_its_card(tiny_gmner_dir, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "examples"))
    run_gmner = importlib.import_module("run_gmner")
    monkeypatch.setattr("hvpnet_hf.model_card.HfApi", RecordingUploads)
    monkeypatch.setattr(RecordingUploads, "uploads", [])
    flags = [
        "--dataset", "sample",
        "--model_name_or_path", tiny_gmner_dir,
        "--num_candidates", "2",
        "--do_train", "false",
        "--output_dir", str(tmp_path),
        "--per_device_eval_batch_size", "16",
        "--disable_tqdm", "true",
        "--report_to", "none",
        "--push_to_hub", "true",
        "--hub_model_id", "someone/hvpnet-gmner",
    ]  # fmt: skip
    results = run_gmner.main(flags)
    [(repo_id, uploaded)] = RecordingUploads.uploads
    assert repo_id == "someone/hvpnet-gmner"
    assert {"README.md", "all_results.json", "config.json", "model.safetensors", "pipelines.py"} <= set(uploaded)
    assert not {"validation_predictions.jsonl", "test_predictions.jsonl"} & set(uploaded)
    card = (tmp_path / "README.md").read_text()
    recall = f"{100 * results['validation_candidate_recall']:.2f}"
    assert f"| validation | {recall} | {100 * results['validation_model_gmner_f1']:.2f} |" in card
    assert "AutoModelForZeroShotObjectDetection" in card


class RecordingUploads:
    """Stands in for `HfApi` in a script run: records the files `upload_folder` would send."""

    uploads = []

    def __init__(self, token=None):
        pass

    def create_repo(self, repo_id, **kwargs):
        pass

    def upload_folder(self, repo_id, folder_path, allow_patterns=None, ignore_patterns=None, **kwargs):
        files = [str(path.relative_to(folder_path)) for path in Path(folder_path).rglob("*") if path.is_file()]
        uploaded = filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns)
        self.uploads.append((repo_id, sorted(uploaded)))
        return "https://hub.example/commit/1"
