"""Local `evaluate` modules for HVPNeT's metrics, loadable without the Hub, and word-level alignment of NER output.

```python
import evaluate
from hvpnet_hf.metrics import metric_path

seqeval = evaluate.load(metric_path("ner_seqeval"))
relation_f1 = evaluate.load(metric_path("re_micro_f1"))
grounded_f1 = evaluate.load(metric_path("gmner_f1"))
```
"""

from pathlib import Path

import numpy as np

from ..processing_hvpnet import ner_word_positions

METRIC_NAMES = ("ner_seqeval", "re_micro_f1", "gmner_f1")


def metric_path(name: str) -> str:
    """Path of the metric script `name` (one of `METRIC_NAMES`), for `evaluate.load`."""
    if name not in METRIC_NAMES:
        raise ValueError(f"unknown metric {name!r}; expected one of {METRIC_NAMES}")
    return str(Path(__file__).with_name(f"{name}.py"))


def align_word_predictions(
    predicted_tags: np.ndarray,
    labels: np.ndarray,
    gold_tags: list[list[str]],
    id2label: dict[int, str],
) -> tuple[list[list[str]], list[list[str]], int]:
    """
    Turns sub-word level NER output back into one tag per word.

    Args:
        predicted_tags: `(num_examples, seq_len)` tag ids at first sub-words, -100 elsewhere (the NER head's
            `decode`, as `HVPNetTrainer` gathers it).
        labels: `(num_examples, seq_len)` gold tag ids at the same positions, -100 elsewhere.
        gold_tags: every example's full list of gold word tags, including words cut off by truncation.
        id2label: tag names.

    Returns:
        `(predictions, references, num_truncated_words)`: per example one tag per word; words the model never saw
        are predicted `"O"` and counted.
    """
    if len(predicted_tags) != len(gold_tags) or len(labels) != len(gold_tags):
        raise ValueError(
            f"got {len(predicted_tags)} predictions and {len(labels)} label rows for {len(gold_tags)} examples"
        )
    predictions, references, num_truncated_words = [], [], 0
    for index, (example_tags, example_labels, words_gold) in enumerate(
        zip(predicted_tags, labels, gold_tags, strict=True)
    ):
        word_positions = example_labels != -100
        seen_gold = [id2label[int(tag)] for tag in example_labels[word_positions]]
        if seen_gold != list(words_gold[: len(seen_gold)]):
            raise ValueError(
                f"example {index}: the labels seen by the model do not match the example's first gold tags"
            )
        # The k-th labeled position holds the k-th word's first sub-word.
        word_ids = np.where(word_positions, np.cumsum(word_positions) - 1, -1)
        word_tags = [
            id2label[int(example_tags[position[1]])] if position is not None else "O"
            for position in ner_word_positions([word_ids.tolist()], len(words_gold))
        ]
        num_truncated_words += len(words_gold) - len(seen_gold)
        predictions.append(word_tags)
        references.append(list(words_gold))
    return predictions, references, num_truncated_words


__all__ = ["METRIC_NAMES", "align_word_predictions", "metric_path"]
