"""examples/run_gmner.py: the baselines' regions on hand-made cases and a run on the bundled grounding set."""

import json
import sys
from pathlib import Path

import pytest
from datasets import Dataset

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


def test_baseline_scores_on_a_hand_made_split():
    # Image 1: a groundable PER whose box is the large candidate, an ungroundable LOC. Image 2: a groundable ORG
    # whose box is the first candidate. Every baseline gives each image's entities one region.
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
                "candidate_boxes": [SMALL, OTHER_LARGE],
            },
        ]
    )
    scores = run_gmner.score_baselines(split)
    # none: only the LOC is right; largest: the PER (IoU > 0.5) and nothing else; first: the ORG.
    assert {rule: round(found["gmner_f1"], 4) for rule, found in scores.items()} == {
        "none": round(1 / 3, 4),
        "largest": round(1 / 3, 4),
        "first": round(1 / 3, 4),
    }
    assert all(found["mner_f1"] == 1.0 for found in scores.values()), "gold spans and types"
    assert scores["largest"]["eeg_f1"] == scores["largest"]["gmner_f1"]


def test_run_on_the_sample_set_reports_recall_and_baselines(tmp_path, capsys):
    results = run_gmner.main([str(EXAMPLES / "configs" / "demo_gmner.yaml"), "--output_dir", str(tmp_path)])
    assert json.loads((tmp_path / "all_results.json").read_text()) == results
    for split in ("validation", "test"):
        # The generator leaves about a tenth of the painted shapes out of the candidates.
        assert 0.8 < results[f"{split}_candidate_recall"] < 1.0
        for rule in run_gmner.BASELINES:
            assert results[f"{split}_{rule}_gmner_f1"] < 0.5, "no baseline grounds most entities of the sample set"
    assert "| baseline largest |" in capsys.readouterr().out


def test_release_flags_are_required_outside_the_sample_set():
    with pytest.raises(ValueError, match="dataset 'twitter_gmner' needs --data_dir, --xml_dir, --object_dir"):
        run_gmner.main(["--dataset", "twitter_gmner"])
