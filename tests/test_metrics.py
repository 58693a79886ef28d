"""The metric modules against cases worked out by hand, and the word-level alignment of NER output."""

import evaluate
import numpy as np
import pytest

from hvpnet_hf.metrics import align_word_predictions, metric_path


@pytest.fixture(scope="module")
def seqeval_metric():
    return evaluate.load(metric_path("ner_seqeval"))


@pytest.fixture(scope="module")
def relation_metric():
    return evaluate.load(metric_path("re_micro_f1"))


def test_ner_entity_level_scores(seqeval_metric):
    references = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O", "O"]]
    # PER exact (correct), LOC missed, ORG boundary wrong (B-ORG I-ORG is a different span), MISC spurious.
    predictions = [["B-PER", "I-PER", "O", "O"], ["B-ORG", "I-ORG", "B-MISC"]]
    scores = seqeval_metric.compute(predictions=predictions, references=references)
    # 3 gold entities, 3 predicted, 1 correct: P = R = F1 = 1/3.
    assert scores["precision"] == pytest.approx(1 / 3)
    assert scores["recall"] == pytest.approx(1 / 3)
    assert scores["f1"] == pytest.approx(1 / 3)
    # 4 of 7 words carry the gold tag.
    assert scores["accuracy"] == pytest.approx(4 / 7)
    assert scores["PER_f1"] == 1.0 and scores["LOC_recall"] == 0.0 and scores["LOC_number"] == 1
    assert scores["MISC_precision"] == 0.0 and scores["MISC_number"] == 0


def test_ner_conlleval_mode_starts_an_entity_at_a_stray_inside_tag(seqeval_metric):
    # conlleval reads "O I-LOC" as a LOC entity starting at the I- tag, so this prediction is right.
    scores = seqeval_metric.compute(predictions=[["O", "I-LOC", "I-LOC"]], references=[["O", "B-LOC", "I-LOC"]])
    assert scores["f1"] == 1.0


def test_ner_rejects_tag_lists_of_different_lengths(seqeval_metric):
    with pytest.raises(ValueError, match="sentence 1: 1 predicted tags for 2 gold tags"):
        seqeval_metric.compute(predictions=[["O"], ["O"]], references=[["O"], ["O", "B-PER"]])


def test_relation_micro_scores_leave_out_none(relation_metric):
    # Gold relations (non-None): examples 0, 1, 3 -> 3. Predicted relations: examples 0, 2, 3, 4 -> 4.
    # Correct relation predictions: example 0 only (example 3 predicts the wrong relation). Example 5 is a correct
    # "None", which counts for accuracy only.
    predictions = [1, 0, 2, 1, 3, 0]
    references = [1, 2, 0, 3, 0, 0]
    scores = relation_metric.compute(predictions=predictions, references=references, none_id=0)
    assert scores["precision"] == pytest.approx(1 / 4)
    assert scores["recall"] == pytest.approx(1 / 3)
    assert scores["f1"] == pytest.approx(2 * (1 / 4) * (1 / 3) / (1 / 4 + 1 / 3))
    assert scores["accuracy"] == pytest.approx(2 / 6)


def test_relation_none_id_is_configurable(relation_metric):
    # With "None" at id 2, predicting 2 everywhere earns no credit at all.
    scores = relation_metric.compute(predictions=[2, 2, 2], references=[0, 1, 2], none_id=2, num_labels=3)
    assert scores["precision"] == 0.0 and scores["recall"] == 0.0 and scores["f1"] == 0.0
    assert scores["accuracy"] == pytest.approx(1 / 3)


def test_unknown_metric_name():
    with pytest.raises(ValueError, match="unknown metric 'f1'"):
        metric_path("f1")


ID2LABEL = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}


def test_alignment_counts_truncated_words_as_predicted_o():
    # Example 0: [CLS] w0 w1## w1 [SEP] pad: 2 words seen of 4 (the last two were cut by truncation).
    labels = np.array([[-100, 1, -100, 0, -100, -100], [-100, 3, 4, 0, -100, -100]])
    predicted = np.array([[-100, 1, -100, 0, -100, -100], [-100, 3, 0, 0, -100, -100]])
    gold = [["B-PER", "O", "B-LOC", "I-LOC"], ["B-LOC", "I-LOC", "O"]]
    predictions, references, num_truncated = align_word_predictions(predicted, labels, gold, ID2LABEL)
    assert predictions == [["B-PER", "O", "O", "O"], ["B-LOC", "O", "O"]]
    assert references == gold
    assert num_truncated == 2


def test_alignment_rejects_labels_that_do_not_match_the_gold_words():
    labels = np.array([[-100, 1, 0, -100]])
    with pytest.raises(ValueError, match="example 0"):
        align_word_predictions(labels, labels, [["O", "O"]], ID2LABEL)
    with pytest.raises(ValueError, match="2 predictions"):
        align_word_predictions(np.concatenate([labels, labels]), labels, [["B-PER", "O"]], ID2LABEL)


@pytest.fixture(scope="module")
def grounded_metric():
    return evaluate.load(metric_path("gmner_f1"))


def entity(start, end, entity_type, **region):
    return {"start": start, "end": end, "type": entity_type, **region}


@pytest.mark.parametrize(
    ("predicted_box", "gold_boxes", "region_right"),
    [
        ([100, 100, 200, 200], [[0, 0, 10, 10], [100, 100, 200, 190]], True),  # the second of several gold boxes
        ([], [], True),  # none against none
        ([0, 0, 10, 10], [], False),  # a box for an ungroundable entity
        ([], [[0, 0, 10, 10]], False),  # none for a groundable entity
        ([0, 0, 4, 1], [[0, 0, 2, 1]], False),  # IoU exactly 0.5 (2 / 4) is not above the threshold
        ([0, 0, 3, 1], [[0, 0, 2, 1]], True),  # IoU 2 / 3
    ],
)
def test_grounded_scores_follow_each_region_rule(grounded_metric, predicted_box, gold_boxes, region_right):
    gold = [[entity(0, 2, "PER", boxes=gold_boxes)]]
    scores = grounded_metric.compute(predictions=[[entity(0, 2, "PER", box=predicted_box)]], references=gold)
    # One gold and one predicted entity with the right span and type: MNER is right whatever the region.
    assert scores["mner_f1"] == 1.0
    assert scores["gmner_f1"] == scores["eeg_f1"] == float(region_right)


def test_grounded_precision_and_recall_count_spans_types_and_regions(grounded_metric):
    references = [
        [entity(0, 2, "PER", boxes=[[0, 0, 10, 10]]), entity(3, 4, "LOC", boxes=[])],
        [entity(1, 2, "ORG", boxes=[[5, 5, 15, 15]])],
    ]
    predictions = [
        # All right; then the right span and region with the wrong type; then a span that is not gold.
        [entity(0, 2, "PER", box=[1, 1, 10, 10]), entity(3, 4, "ORG", box=[]), entity(5, 6, "PER", box=[])],
        # The right span and type in the wrong region.
        [entity(1, 2, "ORG", box=[50, 50, 60, 60])],
    ]
    scores = grounded_metric.compute(predictions=predictions, references=references)
    assert (scores["num_predicted"], scores["num_gold"]) == (4, 3)
    # Correct: GMNER 1 (the first), MNER 2 (the first and last), EEG 2 (the first two).
    assert scores["gmner_precision"] == pytest.approx(1 / 4) and scores["gmner_recall"] == pytest.approx(1 / 3)
    assert scores["mner_precision"] == pytest.approx(2 / 4) and scores["mner_recall"] == pytest.approx(2 / 3)
    assert scores["eeg_f1"] == pytest.approx(2 * (2 / 4) * (2 / 3) / (2 / 4 + 2 / 3))


def test_grounded_metric_rejects_two_entities_of_one_span(grounded_metric):
    twice = [[entity(0, 1, "PER", box=[]), entity(0, 1, "LOC", box=[])]]
    with pytest.raises(ValueError, match=r"example 0: two predicted entities have the span \[0, 1\)"):
        grounded_metric.compute(predictions=twice, references=[[entity(0, 1, "PER", boxes=[])]])
