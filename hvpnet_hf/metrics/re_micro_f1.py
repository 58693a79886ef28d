"""Micro precision, recall and F1 of relation labels over every relation except the one meaning "no relation"."""

import datasets
import evaluate
from sklearn.metrics import precision_recall_fscore_support

from .metric_info import metric_info

_DESCRIPTION = """
Micro-averaged precision, recall and F1 for relation classification as the MNRE benchmark and the HVPNeT paper
report them: the "no relation" label (`None`) is left out of the averaged labels, so predicting `None` never earns
credit, and predicting a relation where the gold is `None` costs precision.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]`): predicted relation ids.
    references (`list[int]`): gold relation ids.
    none_id (`int`, defaults to 0): id of the "no relation" label.
    num_labels (`int`, *optional*): number of relation labels; defaults to every id seen in the inputs.
Returns:
    `precision`, `recall`, `f1` (micro over all relations but `none_id`) and `accuracy` (over all examples).
Example:
    >>> metric = evaluate.load(hvpnet_hf.metrics.metric_path("re_micro_f1"))
    >>> metric.compute(predictions=[1, 0, 2], references=[1, 2, 0], none_id=0)["f1"]
    0.5
"""

_CITATION = """
@inproceedings{zheng2021multimodal,
    title = {Multimodal Relation Extraction with Efficient Graph Alignment},
    author = {Zheng, Changmeng and Feng, Junhao and Fu, Ze and Cai, Yi and Li, Qing and Wang, Tao},
    booktitle = {Proceedings of the 29th ACM International Conference on Multimedia},
    year = {2021},
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ReMicroF1(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        label = datasets.Value("int64")
        return metric_info(_DESCRIPTION, _KWARGS_DESCRIPTION, _CITATION, {"predictions": label, "references": label})

    def _compute(
        self, predictions: list[int], references: list[int], none_id: int = 0, num_labels: int | None = None
    ) -> dict[str, float]:
        if num_labels is None:
            num_labels = max([*predictions, *references, none_id]) + 1
        relation_ids = [label for label in range(num_labels) if label != none_id]
        precision, recall, f1, _ = precision_recall_fscore_support(
            references, predictions, labels=relation_ids, average="micro", zero_division=0
        )
        correct = sum(int(predicted == gold) for predicted, gold in zip(predictions, references, strict=True))
        return {
            "precision": float(precision),
            "recall": float(recall),
            "f1": float(f1),
            "accuracy": correct / len(references) if references else 0.0,
        }
