"""
The prediction files of `hvpnet-predict` and the example scripts: CoNLL columns for NER, one JSON object per line for
RE. A file appears only when all of it is written (see `output_files.atomic_write`), so a failed run leaves neither an
empty nor a partial prediction file, and an earlier one stays as it was.
"""

import json
import os
from collections.abc import Iterable, Mapping, Sequence

from .output_files import atomic_write


def conll_row(word: str, gold: str, predicted: str) -> str:
    """One `word gold predicted` line; the word's whitespace becomes `_` (an empty word is `_`), keeping 3 columns."""
    return f"{'_'.join(word.split()) or '_'} {gold} {predicted}\n"


def write_ner_predictions(
    path: str | os.PathLike, sentences: Iterable[tuple[Sequence[str], Sequence[str], Sequence[str]]]
) -> None:
    """Per sentence `(words, gold tags, predicted tags)`: one `conll_row` per word, a blank line after each sentence."""
    with atomic_write(path) as temporary, open(temporary, "w", encoding="utf-8") as file:
        for words, gold, predicted in sentences:
            file.writelines(conll_row(*columns) for columns in zip(words, gold, predicted, strict=True))
            file.write("\n")


def read_conll(path: str | os.PathLike) -> list[tuple[list[str], list[str], list[str]]]:
    """The `(words, gold tags, predicted tags)` sentences of a file `write_ner_predictions` wrote."""
    sentences, words, gold, predicted = [], [], [], []
    with open(path, encoding="utf-8") as file:
        lines = file.read().splitlines() + [""]
    for line_no, line in enumerate(lines, start=1):
        if line.strip():
            columns = line.split()
            if len(columns) != 3:
                raise ValueError(f"{path}:{line_no}: expected 'word gold predicted', got {line!r}")
            word, gold_tag, predicted_tag = columns
            words.append(word)
            gold.append(gold_tag)
            predicted.append(predicted_tag)
        elif words:
            sentences.append((words, gold, predicted))
            words, gold, predicted = [], [], []
    return sentences


def write_re_predictions(
    path: str | os.PathLike,
    examples: Iterable[Mapping],
    gold: Iterable[str],
    ranked: Iterable[list[dict]],
    top_k: bool,
) -> None:
    """
    One JSON object per example: its `id`, `head` and `tail`, the `gold` relation, the `predicted` one and its
    probability `score`; with `top_k`, also the ranked `[{"relation", "score"}, ...]` list. `ranked` gives, per
    example, relations with their probabilities, most probable first.
    """
    with atomic_write(path) as temporary, open(temporary, "w", encoding="utf-8") as file:
        for example, gold_relation, relations in zip(examples, gold, ranked, strict=True):
            record = {"id": example["id"], "head": example["head"], "tail": example["tail"], "gold": gold_relation}
            record.update({"predicted": relations[0]["relation"], "score": round(relations[0]["score"], 4)})
            if top_k:
                record["top_k"] = [{**item, "score": round(item["score"], 4)} for item in relations]
            file.write(json.dumps(record, ensure_ascii=False) + "\n")


__all__ = ["conll_row", "read_conll", "write_ner_predictions", "write_re_predictions"]
