"""
The prediction files of `hvpnet-predict` and the example scripts: CoNLL columns for NER, one JSON object per line for
RE and grounded NER. Each is a sequence of records, one per example, in input order: a sentence's rows and the blank line that ends
it, or one JSON line.

The example scripts write a whole file at once (see `output_files.atomic_write`), so a failed run leaves neither an
empty nor a partial prediction file, and an earlier one stays as it was. `hvpnet-predict` writes its records as they
are made with a `PredictionWriter`, to `<file>.partial`, renamed to the file when the last one is written; a rerun
keeps the records of the partial file that continue it (a record cut short by a kill is dropped) and appends the
rest. `interleave_records` merges the files of several processes, each holding every n-th example.
"""

import json
import logging
import os
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .output_files import atomic_write

logger = logging.getLogger(__name__)


def conll_word(word: str) -> str:
    """A word as a CoNLL row writes it: its whitespace becomes `_` (an empty word is `_`), keeping 3 columns."""
    return "_".join(word.split()) or "_"


def conll_row(word: str, gold: str, predicted: str) -> str:
    """One `word gold predicted` line (the word as `conll_word` writes it)."""
    return f"{conll_word(word)} {gold} {predicted}\n"


def ner_record(words: Sequence[str], gold: Sequence[str], predicted: Sequence[str]) -> str:
    """One sentence of an NER prediction file: a `conll_row` per word and the blank line that ends it."""
    return "".join(conll_row(*columns) for columns in zip(words, gold, predicted, strict=True)) + "\n"


def re_record(example: Mapping[str, Any], gold: str, relations: list[dict], top_k: bool) -> str:
    """
    One line of an RE prediction file: a JSON object with the example's `id`, `head` and `tail`, the `gold` relation,
    the `predicted` one and its probability `score`; with `top_k`, also the ranked `[{"relation", "score"}, ...]`.
    `relations` are relations with their probabilities, most probable first.
    """
    record = {"id": example["id"], "head": example["head"], "tail": example["tail"], "gold": gold}
    record.update({"predicted": relations[0]["relation"], "score": round(relations[0]["score"], 4)})
    if top_k:
        record["top_k"] = [{**item, "score": round(item["score"], 4)} for item in relations]
    return json.dumps(record, ensure_ascii=False) + "\n"


def gmner_record(example: Mapping[str, Any], entities: Sequence[Mapping[str, Any]]) -> str:
    """
    One line of a grounded NER prediction file: a JSON object with the example's `id`, `image_id`, `tokens` and `gold`
    entities (as `load_gmner_dataset` reads them: `start`, `end`, `type`, `text`, `boxes`), and the predicted
    `entities`, each with `start` and `end` (word offsets, end exclusive), `text` (its words), `type`, `box` (its region
    `[xmin, ymin, xmax, ymax]` in image pixels, or null for none) and `region_score` (the probability of that choice).
    """
    words = example["tokens"]
    found = [
        {
            "start": entity["start"],
            "end": entity["end"],
            "text": " ".join(words[entity["start"] : entity["end"]]),
            "type": entity["type"],
            "box": entity["box"],
            "region_score": round(entity["region_score"], 4),
        }
        for entity in entities
    ]
    record = {"id": example["id"], "image_id": example["image_id"], "tokens": words, "gold": example["entities"]}
    return json.dumps({**record, "entities": found}, ensure_ascii=False) + "\n"


def write_ner_predictions(
    path: str | os.PathLike, sentences: Iterable[tuple[Sequence[str], Sequence[str], Sequence[str]]]
) -> None:
    """Per sentence `(words, gold tags, predicted tags)`: one `ner_record` each, the file written at once."""
    with atomic_write(path) as temporary, open(temporary, "w", encoding="utf-8") as file:
        file.writelines(ner_record(*sentence) for sentence in sentences)


def write_re_predictions(
    path: str | os.PathLike,
    examples: Iterable[Mapping],
    gold: Iterable[str],
    ranked: Iterable[list[dict]],
    top_k: bool,
) -> None:
    """One `re_record` per example (with its gold relation and its ranked relations), the file written at once."""
    with atomic_write(path) as temporary, open(temporary, "w", encoding="utf-8") as file:
        for example, gold_relation, relations in zip(examples, gold, ranked, strict=True):
            file.write(re_record(example, gold_relation, relations, top_k))


def iter_conll(path: str | os.PathLike) -> Iterator[tuple[list[str], list[str], list[str]]]:
    """The `(words, gold tags, predicted tags)` sentences of an NER prediction file, read one at a time."""
    words, gold, predicted = [], [], []
    with open(path, encoding="utf-8") as file:
        for line_no, line in enumerate(file, start=1):
            if not line.strip():
                if words:
                    yield words, gold, predicted
                words, gold, predicted = [], [], []
                continue
            columns = line.split()
            if len(columns) != 3:
                raise ValueError(f"{path}:{line_no}: expected 'word gold predicted', got {line.rstrip(chr(10))!r}")
            words.append(columns[0])
            gold.append(columns[1])
            predicted.append(columns[2])
    if words:
        yield words, gold, predicted


def read_conll(path: str | os.PathLike) -> list[tuple[list[str], list[str], list[str]]]:
    """The `(words, gold tags, predicted tags)` sentences of a file `write_ner_predictions` wrote."""
    return list(iter_conll(path))


@dataclass(frozen=True)
class RecordFormat:
    """
    A prediction file read as records: `ends_record` tells whether a whole line (its newline included) ends a record,
    and `key` reads from a record's text what names its example (the words of a sentence, the id of a relation).
    """

    ends_record: Callable[[bytes], bool]
    key: Callable[[str], Hashable]


def _conll_key(record: str) -> tuple[str, ...]:
    return tuple(line.split(" ", 1)[0] for line in record.splitlines() if line)


def _json_key(record: str) -> str | None:
    try:
        return json.loads(record).get("id")
    except (ValueError, AttributeError):  # a line that is not a JSON object names no example
        return None


NER_RECORDS = RecordFormat(ends_record=lambda line: line == b"\n", key=_conll_key)
RE_RECORDS = RecordFormat(ends_record=lambda line: True, key=_json_key)
# A grounded NER record is a JSON line named by its example's id too.
GMNER_RECORDS = RE_RECORDS


def complete_records(path: str | os.PathLike, record_format: RecordFormat) -> Iterator[tuple[str, int]]:
    """
    The whole records of a prediction file, one at a time, each with the byte offset where it ends; a last record
    that was not finished (a line without its newline, a sentence without its blank line) is left out.
    """
    lines, offset = [], 0
    with open(path, "rb") as file:
        for line in file:
            if not line.endswith(b"\n"):
                return
            lines.append(line)
            offset += len(line)
            if record_format.ends_record(line):
                yield b"".join(lines).decode("utf-8", errors="replace"), offset
                lines = []


class PredictionWriter:
    """
    Writes the records of one run to `<path>.partial`, each flushed as it comes, and renames that file to `path` once
    the last is written (`finish`): `path` is never a partial file. It holds no record after writing it.
    """

    def __init__(self, path: str | os.PathLike, record_format: RecordFormat):
        self.path = Path(path)
        self.partial = self.path.with_name(f"{self.path.name}.partial")
        self.record_format = record_format
        self.file = None

    def resume(self, expected_keys: Iterable[Hashable]) -> int:
        """
        Opens the partial file for writing and returns how many records it already holds: the leading records whose
        keys are `expected_keys` (the keys of the examples this run writes, in order), read one at a time. A last
        record that does not match (cut short by a kill) is cut off; a mismatch before the last record is an error,
        since the file is then not this run's.
        """
        kept, end = 0, 0
        if self.partial.is_file():
            keys = iter(expected_keys)
            records = complete_records(self.partial, self.record_format)
            for record, record_end in records:
                if self.record_format.key(record) != next(keys, None):
                    if next(records, None) is not None:
                        raise ValueError(
                            f"{self.partial}: record {kept + 1} is not the prediction of the run's example "
                            f"{kept + 1}: the file does not continue this run; remove it to start over"
                        )
                    break
                kept, end = kept + 1, record_end
            if end < self.partial.stat().st_size:
                logger.warning("%s: cut off an unfinished last record after %d whole ones", self.partial, kept)
            os.truncate(self.partial, end)
        self.file = open(self.partial, "a" if kept else "w", encoding="utf-8")  # noqa: SIM115 (closed by finish)
        return kept

    def write(self, record: str) -> None:
        """Appends one record and flushes it to the file."""
        self.file.write(record)
        self.file.flush()

    def finish(self) -> None:
        """Closes the partial file and renames it to the output."""
        self.close()
        os.replace(self.partial, self.path)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def interleave_records(shards: Sequence[Path], path: str | os.PathLike, record_format: RecordFormat) -> int:
    """
    Writes to `path` (at once) the records of the `shards`, of which the r-th holds the examples r, r + n, r + 2n,
    ... (n shards), in input order, reading one record of each at a time; returns their number. Shards whose numbers
    of records are not those of such a split of one input are an error naming them.
    """
    readers = [complete_records(shard, record_format) for shard in shards]
    counts = [0] * len(shards)
    with atomic_write(path) as temporary, open(temporary, "w", encoding="utf-8") as file:
        position = 0
        while (item := next(readers[position], None)) is not None:
            file.write(item[0])
            counts[position] += 1
            position = (position + 1) % len(shards)
        # A split of one input ends at the first shard without a next record: the others have none left either.
        longer = [str(shards[rank]) for rank, reader in enumerate(readers) if next(reader, None) is not None]
        if longer:
            raise ValueError(
                f"{shards[position]} ends after {counts[position]} records while {', '.join(longer)} hold more: "
                f"the files are not one input split over {len(shards)} processes"
            )
    return sum(counts)


__all__ = [
    "GMNER_RECORDS",
    "NER_RECORDS",
    "RE_RECORDS",
    "PredictionWriter",
    "RecordFormat",
    "complete_records",
    "conll_row",
    "conll_word",
    "gmner_record",
    "interleave_records",
    "iter_conll",
    "ner_record",
    "re_record",
    "read_conll",
    "write_ner_predictions",
    "write_re_predictions",
]
