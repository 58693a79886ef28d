"""Precision, recall and F1 of grounded multimodal NER (entity span, type and region), with its MNER and EEG parts."""

from collections.abc import Mapping, Sequence

import datasets
import evaluate
import torch
from torchvision.ops import box_iou

from .metric_info import metric_info

# A predicted box is the entity's region when its IoU with one of the entity's gold boxes is above this (strictly:
# NUSTM's evaluation keeps the candidates whose IoU is `> 0.5`).
IOU_THRESHOLD = 0.5

_DESCRIPTION = """
Grounded multimodal NER as Yu et al. (2023) score it. An entity is a word span, a type and a region: a box, or none
when the entity is not in the picture. A predicted entity is correct when its span and type are exactly those of a
gold entity and its region is right: none for an ungroundable gold entity (one without boxes), or a box whose IoU
with one of the gold entity's boxes is above 0.5 for a groundable one. Three micro scores are returned: GMNER
(span, type and region), MNER (span and type) and EEG, entity extraction and grounding (span and region).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[list[dict]]`): per example, its predicted entities: `start`, `end` (word offsets, end
        exclusive), `type` and `box` (`[xmin, ymin, xmax, ymax]` in the image's pixels; an empty list or None for none).
    references (`list[list[dict]]`): per example, its gold entities: `start`, `end`, `type` and `boxes` (every gold
        box of the entity; an empty list for an ungroundable entity).
Returns:
    `gmner_precision`, `gmner_recall`, `gmner_f1`, the same for `mner_` and `eeg_`, and the counts `num_predicted`
    and `num_gold`.
Example:
    >>> metric = evaluate.load(hvpnet_hf.metrics.metric_path("gmner_f1"))
    >>> gold = [[{"start": 0, "end": 2, "type": "PER", "boxes": [[10, 10, 50, 90]]}]]
    >>> predicted = [[{"start": 0, "end": 2, "type": "PER", "box": [12, 8, 52, 88]}]]
    >>> metric.compute(predictions=predicted, references=gold)["gmner_f1"]
    1.0
"""

_CITATION = """
@inproceedings{yu-etal-2023-grounded,
    title = "Grounded Multimodal Named Entity Recognition on Social Media",
    author = "Yu, Jianfei and Li, Ziyan and Wang, Jieming and Xia, Rui",
    booktitle = "Proceedings of the 61st Annual Meeting of the Association for Computational Linguistics",
    year = "2023",
    pages = "9141--9154",
}
"""


def region_ious(box: Sequence[float], gold_boxes: Sequence[Sequence[float]]) -> torch.Tensor:
    """`(len(gold_boxes),)` IoU of `box` with each gold box (`[xmin, ymin, xmax, ymax]` in pixels)."""
    if not gold_boxes:
        return torch.zeros(0)
    return box_iou(torch.tensor([box], dtype=torch.float64), torch.tensor(gold_boxes, dtype=torch.float64))[0]


def region_is_right(box: Sequence[float] | None, gold_boxes: Sequence[Sequence[float]]) -> bool:
    """Whether a predicted region (a box, or an empty list / None for none) is the region of an entity with
    `gold_boxes` (none when empty)."""
    if not gold_boxes:
        return not box
    return bool(box) and bool((region_ious(box, gold_boxes) > IOU_THRESHOLD).any())


def _by_span(entities: Sequence[Mapping], index: int, what: str) -> dict[tuple[int, int], Mapping]:
    spans: dict[tuple[int, int], Mapping] = {}
    for entity in entities:
        span = (entity["start"], entity["end"])
        if span in spans:
            raise ValueError(f"example {index}: two {what} entities have the span [{span[0]}, {span[1]})")
        if entity.get("box") and len(entity["box"]) != 4:
            raise ValueError(f"example {index}: the box of span [{span[0]}, {span[1]}) is not 4 numbers")
        spans[span] = entity
    return spans


def _scores(correct: int, num_predicted: int, num_gold: int) -> tuple[float, float, float]:
    precision = correct / num_predicted if num_predicted else 0.0
    recall = correct / num_gold if num_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class GmnerF1(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        span = {"start": datasets.Value("int32"), "end": datasets.Value("int32"), "type": datasets.Value("string")}
        box = datasets.List(datasets.Value("float64"))
        return metric_info(
            _DESCRIPTION,
            _KWARGS_DESCRIPTION,
            _CITATION,
            {
                "predictions": datasets.List({**span, "box": box}),
                "references": datasets.List({**span, "boxes": datasets.List(box)}),
            },
        )

    def _compute(self, predictions: list[list[dict]], references: list[list[dict]]) -> dict[str, float]:
        correct = {"gmner": 0, "mner": 0, "eeg": 0}
        num_predicted = num_gold = 0
        for index, (predicted, gold) in enumerate(zip(predictions, references, strict=True)):
            predicted_spans = _by_span(predicted, index, "predicted")
            gold_spans = _by_span(gold, index, "gold")
            num_predicted += len(predicted_spans)
            num_gold += len(gold_spans)
            for span, entity in predicted_spans.items():
                if span not in gold_spans:
                    continue
                type_right = entity["type"] == gold_spans[span]["type"]
                region_right = region_is_right(entity["box"], gold_spans[span]["boxes"])
                correct["gmner"] += type_right and region_right
                correct["mner"] += type_right
                correct["eeg"] += region_right
        scores: dict[str, float] = {}
        for name, count in correct.items():
            precision, recall, f1 = _scores(count, num_predicted, num_gold)
            scores.update({f"{name}_precision": precision, f"{name}_recall": recall, f"{name}_f1": f1})
        return {**scores, "num_predicted": num_predicted, "num_gold": num_gold}
