"""Entity-level precision, recall and F1 of BIO-tagged words, scored like conlleval (the HVPNeT paper's NER metric)."""

import datasets
import evaluate
from seqeval.metrics import accuracy_score, classification_report

from .metric_info import metric_info

_DESCRIPTION = """
Entity-level micro precision, recall and F1 over word sequences tagged in BIO, computed with seqeval in its default
(conlleval-compatible) mode: an `I-X` tag after `O` or after another type starts a new entity. Scores are per word,
not per sub-word piece: pass one tag per word. Words a model never saw (cut by truncation) belong in the
predictions as `O`, so that they count against recall instead of disappearing.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[list[str]]`): predicted tags, one list per sentence, one tag per word.
    references (`list[list[str]]`): gold tags, same shape as `predictions`.
Returns:
    `precision`, `recall`, `f1` (entity-level micro averages), `accuracy` (word-level tag accuracy) and, for every
    entity type `X` in the references or predictions, `X_precision`, `X_recall`, `X_f1` and `X_number` (gold count).
Example:
    >>> metric = evaluate.load(hvpnet_hf.metrics.metric_path("ner_seqeval"))
    >>> metric.compute(predictions=[["B-PER", "I-PER", "O"]], references=[["B-PER", "I-PER", "O"]])["f1"]
    1.0
"""

_CITATION = """
@inproceedings{ramshaw-marcus-1995-text,
    title = "Text Chunking using Transformation-Based Learning",
    author = "Ramshaw, Lance and Marcus, Mitch",
    booktitle = "Third Workshop on Very Large Corpora",
    year = "1995",
}
@misc{seqeval,
    title = {seqeval: A Python framework for sequence labeling evaluation},
    author = {Hiroki Nakayama},
    year = {2018},
    url = {https://github.com/chakki-works/seqeval},
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class NerSeqeval(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        tags = datasets.Sequence(datasets.Value("string"))
        return metric_info(_DESCRIPTION, _KWARGS_DESCRIPTION, _CITATION, {"predictions": tags, "references": tags})

    def _compute(self, predictions: list[list[str]], references: list[list[str]]) -> dict[str, float]:
        for index, (predicted, gold) in enumerate(zip(predictions, references, strict=True)):
            if len(predicted) != len(gold):
                raise ValueError(
                    f"sentence {index}: {len(predicted)} predicted tags for {len(gold)} gold tags; pass one tag per "
                    "word (words cut by truncation as 'O')"
                )
        report = classification_report(references, predictions, output_dict=True, zero_division=0)
        overall = report.pop("micro avg")
        scores = {
            "precision": float(overall["precision"]),
            "recall": float(overall["recall"]),
            "f1": float(overall["f1-score"]),
            "accuracy": float(accuracy_score(references, predictions)),
        }
        for entity_type, type_scores in report.items():
            if entity_type.endswith(" avg"):
                continue
            scores[f"{entity_type}_precision"] = float(type_scores["precision"])
            scores[f"{entity_type}_recall"] = float(type_scores["recall"])
            scores[f"{entity_type}_f1"] = float(type_scores["f1-score"])
            scores[f"{entity_type}_number"] = int(type_scores["support"])
        return scores
