"""
Data sets of the user's own, read the way transformers' example scripts read them: a `datasets` data set (a Hub id,
read through the local cache when offline, or a folder written by `save_to_disk`) or JSON lines, CSV and Parquet
files, with the columns named by flags. `load_table_dataset` normalizes them into the columns the loaders of
`hvpnet_hf.loading` give (`id`, `tokens`, `ner_tags` or `head` / `tail` / `relation`, `image_id`, `image`,
`objects`), so everything after loading reads them as it reads a published release.

- Words: a list of strings per row. Labels: NER tag names (`O`, `B-TYPE`, `I-TYPE`) or a `ClassLabel` sequence; a
  relation name or a `ClassLabel`. RE entities: `{"start", "end"}` word offsets, end exclusive (an optional `name`),
  or MNRE's `{"name", "pos": [start, end]}`.
- The label set is the `ClassLabel`'s names, else the names of the train split (the neutral label, `O` or `None`,
  first, then sorted), else a trained model's. A label outside the set is an error naming the split, the row and it.
- Streaming (`streaming=True`): the splits are `IterableDataset`s, read row by row by the same row function as in
  memory, so nothing is read ahead: the label set is the one given (a trained model's, or names the user lists; a
  `ClassLabel`'s ids are re-encoded onto it by name), else the `ClassLabel`'s, and there is no train split to read
  it from. Missing images are masked as rows are read and counted once per row however often a split is read;
  `ImageCounts.report` logs the counts when the run is over.
- Images and crops: an `Image()` feature (embedded bytes or a path) or path strings; an empty value means no image.
  A relative path in a data file resolves against the file's folder (as `datasets`' image folders read the
  `file_name` of their `metadata.jsonl`), so a file and its pictures move together. URLs are refused: the package
  reads images from files only. Missing or unreadable images follow `missing_images` as in the file loaders (masked
  and counted, or an error naming the row); a column of which not one image is found is an error.
- A cell of a CSV file holding a list or a mapping is read as a JSON or Python literal (`["EU", "rejects"]`).
"""

import ast
import io
import json
import logging
import os
from collections.abc import Mapping, Sequence
from itertools import chain
from pathlib import Path
from typing import Any

from datasets import (
    ClassLabel,
    Dataset,
    DatasetDict,
    Features,
    IterableDataset,
    IterableDatasetDict,
    List,
    Value,
    load_dataset,
    load_from_disk,
)
from datasets import Image as ImageFeature

from .collating import with_undecoded_images
from .image_processing_hvpnet import _check_policy, image_header_problem, image_source
from .loading import NO_RELATION, split_of_alias

logger = logging.getLogger(__name__)

# The data files read as tables, by extension, and the `datasets` builder of each; any other file is a release file.
TABLE_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# Per task, the loaders' columns read from a user's data set; by default each is read from the column of its own name.
TASK_COLUMNS = {
    "ner": ("tokens", "ner_tags", "image", "objects"),
    "re": ("tokens", "head", "tail", "relation", "image", "objects"),
}
# The flag naming the data set's column of each loader column.
COLUMN_FLAGS = {
    "tokens": "text_column_name",
    "ner_tags": "label_column_name",
    "relation": "label_column_name",
    "image": "image_column_name",
    "objects": "objects_column_name",
    "head": "head_column_name",
    "tail": "tail_column_name",
}
# The loaders' label column of each task.
LABEL_COLUMNS = {"ner": "ner_tags", "re": "relation"}
# The label that comes first in a label set read from the data.
NEUTRAL_LABEL = {"ner": "O", "re": NO_RELATION}
IMAGE_COLUMNS = ("image", "objects")


def is_table_file(path: str | os.PathLike) -> bool:
    """Whether a data file is read as a table (JSON lines, CSV, Parquet) rather than in a published format."""
    return Path(path).suffix.lower() in TABLE_FORMATS


def read_table_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    data_files: Mapping[str, str | os.PathLike] | None = None,
    streaming: bool = False,
) -> DatasetDict | IterableDatasetDict:
    """
    The splits of a `save_to_disk` folder, a Hub data set (`dataset_name`) or of table files (`data_files`, all of
    one format), as `datasets` reads them, with `streaming` as `IterableDataset`s; the releases' split names (`dev`,
    `valid`, `val`) are read as `validation`.
    """
    if (dataset_name is None) == (data_files is None):
        raise ValueError("give either dataset_name or data files (train_file, validation_file, test_file)")
    if dataset_name is not None:
        if (Path(dataset_name) / "dataset_dict.json").is_file():
            splits = load_from_disk(dataset_name)
            if streaming:  # read from the memory-mapped Arrow files as they are iterated
                splits = IterableDatasetDict(
                    {split: dataset.to_iterable_dataset() for split, dataset in splits.items()}
                )
        elif Path(dataset_name).is_dir() and (Path(dataset_name) / "state.json").is_file():
            raise ValueError(f"dataset_name {dataset_name} holds one split; save a DatasetDict with save_to_disk")
        else:
            splits = load_dataset(dataset_name, dataset_config_name, streaming=streaming)
    else:
        suffixes = {Path(path).suffix.lower() for path in data_files.values()}
        if len(suffixes) != 1 or not is_table_file(f"file{next(iter(suffixes))}"):
            raise ValueError(
                f"data files must all be one of {sorted(TABLE_FORMATS)}, got {[str(p) for p in data_files.values()]}"
            )
        missing = [f"{split}: {path}" for split, path in data_files.items() if not Path(path).is_file()]
        if missing:
            raise FileNotFoundError(f"data files not found: {', '.join(missing)}")
        empty = [f"{split}: {path}" for split, path in data_files.items() if Path(path).stat().st_size == 0]
        if empty:
            raise ValueError(f"data files without a single row: {', '.join(empty)}")
        builder = TABLE_FORMATS[suffixes.pop()]
        files = {split: str(path) for split, path in data_files.items()}
        splits = load_dataset(builder, data_files=files, streaming=streaming)
    return type(splits)({split_of_alias(split) or split: dataset for split, dataset in splits.items()})


def load_table_dataset(
    task: str,
    columns: Mapping[str, str],
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    data_files: Mapping[str, str | os.PathLike] | None = None,
    label_names: Sequence[str] | None = None,
    missing_images: str = "mask",
    mask_images: bool = False,
    text_only: str = "mask the images to use the text only",
) -> DatasetDict:
    """
    A user's data set (see `read_table_dataset`) in the columns of the file loaders of `task` (see the module
    docstring).

    Args:
        task: `"ner"` or `"re"`.
        columns: for each column of `TASK_COLUMNS[task]`, the data set's column it is read from. The image and crop
            columns may be absent when they keep their default names (the data is then read as text only).
        label_names: a trained model's labels, the label set of data that has neither a `ClassLabel` nor a train
            split.
        missing_images: `"mask"` or `"error"`, as in the file loaders.
        mask_images: read no image at all (every image and crop is None).
        text_only: how to ask for the text only, said when not one image of a column is found.
    """
    sources = {"dataset_name": dataset_name, "dataset_config_name": dataset_config_name, "data_files": data_files}
    splits, images = _normalized_splits(task, columns, sources, label_names, missing_images, mask_images, False)
    images.check_found(text_only)
    return splits


def stream_table_dataset(
    task: str,
    columns: Mapping[str, str],
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    data_files: Mapping[str, str | os.PathLike] | None = None,
    label_names: Sequence[str] | None = None,
    missing_images: str = "mask",
    mask_images: bool = False,
) -> tuple[IterableDatasetDict, "ImageCounts"]:
    """
    The splits of `load_table_dataset` (same arguments) as `IterableDataset`s, normalized row by row as they are
    read, and the counts of their images, filled as they are read (report them with `ImageCounts.report`
    once the run has read the splits). The label set is `label_names`, else the `ClassLabel`'s: no split is read
    ahead to find it.
    """
    sources = {"dataset_name": dataset_name, "dataset_config_name": dataset_config_name, "data_files": data_files}
    return _normalized_splits(task, columns, sources, label_names, missing_images, mask_images, True)


def _normalized_splits(
    task: str,
    columns: Mapping[str, str],
    sources: Mapping[str, Any],
    label_names: Sequence[str] | None,
    missing_images: str,
    mask_images: bool,
    streaming: bool,
) -> tuple[DatasetDict | IterableDatasetDict, "ImageCounts"]:
    """The splits of `load_table_dataset` and `stream_table_dataset`, and the image readers that read them."""
    _check_policy(missing_images)
    splits = read_table_dataset(**sources, streaming=streaming)
    _check_columns(splits, task, columns)
    splits = type(splits)({split: _loader_columns(dataset, task, columns) for split, dataset in splits.items()})
    names = _label_names(task, splits, columns, label_names, streaming)
    base_dirs = {split: Path(path).parent for split, path in (sources["data_files"] or {}).items()}
    normalizers = {
        split: _RowNormalizer(split, task, columns, names, dataset, base_dirs.get(split), missing_images, mask_images)
        for split, dataset in splits.items()
    }
    normalized = type(splits)({split: normalizers[split].apply(dataset) for split, dataset in splits.items()})
    readers = [reader for normalizer in normalizers.values() for reader in normalizer.readers.values()]
    return normalized, ImageCounts(readers)


def _check_columns(splits: DatasetDict, task: str, columns: Mapping[str, str]) -> None:
    """Refuses a split without one of the columns to read (an image column only when named by its user)."""
    for split, dataset in splits.items():
        for column in TASK_COLUMNS[task]:
            name = columns[column]
            optional = column in IMAGE_COLUMNS and name == column
            if name not in dataset.column_names and not optional:
                raise ValueError(
                    f"the {split} split has no column {name!r} (--{COLUMN_FLAGS[column]}); its columns are "
                    f"{dataset.column_names}"
                )


def _loader_columns(
    dataset: Dataset | IterableDataset, task: str, columns: Mapping[str, str]
) -> Dataset | IterableDataset:
    """
    The columns to read of `dataset`, under the loaders' names, its `Image()` columns read undecoded (see
    `with_undecoded_images`): images are decoded only when a batch is drawn, with the package's policy.
    """
    present = {columns[column]: column for column in TASK_COLUMNS[task] if columns[column] in dataset.column_names}
    if isinstance(dataset, IterableDataset):
        dataset = dataset.decode(False)  # a stream's renamed columns would be decoded (and images encoded again)
    dataset = dataset.select_columns(list(present)).rename_columns(
        {name: column for name, column in present.items() if name != column}
    )
    return with_undecoded_images(dataset)


def _label_names(
    task: str,
    splits: DatasetDict | IterableDatasetDict,
    columns: Mapping[str, str],
    given_names: Sequence[str] | None,
    streaming: bool,
) -> list[str]:
    """
    The label set: the `ClassLabel`'s names, else the train split's names, else `given_names` (a trained model's
    labels). Streaming, `given_names` come first (a `ClassLabel`'s ids are re-encoded onto them by name) and no
    split is read for them.
    """
    column = columns[LABEL_COLUMNS[task]]
    feature = next(iter(splits.values())).features[LABEL_COLUMNS[task]]
    class_label = feature.feature if isinstance(feature, List) else feature
    if streaming and given_names is not None:
        names = list(given_names)
    elif isinstance(class_label, ClassLabel):
        names = class_label.names
    elif streaming:
        raise ValueError(
            f"column {column!r} holds label names, and streaming reads no split ahead to find the label set: give "
            "the label names (--label_set), a trained model, or the column as a ClassLabel"
        )
    elif "train" in splits:
        values = splits["train"][LABEL_COLUMNS[task]]
        # A row that is not a list of tags is refused, naming the row, when the split is read.
        tag_lists = [tags for tags in map(_literal, values) if isinstance(tags, list)]
        found = set(chain.from_iterable(tag_lists)) if task == "ner" else set(values)
        names = sorted(found, key=lambda name: (name != NEUTRAL_LABEL[task], name))
    elif given_names is not None:
        names = list(given_names)
    else:
        raise ValueError(
            f"column {column!r} holds label names and there is no train split to read the label set from: give a "
            "train split, a trained model, or the column as a ClassLabel"
        )
    if task == "ner":
        wrong = [name for name in names if name != "O" and not name.startswith(("B-", "I-"))]
        if wrong:
            raise ValueError(f"the NER labels of column {column!r} are not BIO tags (O, B-TYPE, I-TYPE): {wrong}")
    return names


def _literal(value: Any) -> Any:
    """A list or mapping written in a CSV cell as a JSON or Python literal, read; any other value as it is."""
    if not (isinstance(value, str) and value.strip()[:1] in ("[", "{")):
        return value
    try:
        return json.loads(value)  # first: JSON's escaped surrogate pairs (emoji) are one character, Python's two
    except ValueError:
        pass
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return value


def _target_features(task: str, dataset: Dataset, names: list[str]) -> Features:
    """
    The loaders' features of `task`; image columns stay `Image()` (undecoded) where the data set has them, and a list
    of a post's images stays a list.
    """
    image_feature = dataset.features.get("image")
    several = isinstance(image_feature, List)
    image_feature = image_feature.feature if several else image_feature
    image = ImageFeature(decode=False) if isinstance(image_feature, ImageFeature) else Value("string")
    image = List(image) if several else image
    crops = dataset.features.get("objects")
    crop = ImageFeature(decode=False) if isinstance(getattr(crops, "feature", None), ImageFeature) else Value("string")
    entity = {"name": Value("string"), "start": Value("int32"), "end": Value("int32")}
    labels = (
        {"ner_tags": List(ClassLabel(names=names))}
        if task == "ner"
        else {"head": entity, "tail": entity, "relation": ClassLabel(names=names)}
    )
    return Features(
        {
            "id": Value("string"),
            "tokens": List(Value("string")),
            **labels,
            "image_id": Value("string"),
            "image": image,
            "objects": List(crop),
        }
    )


class _ImageReader:
    """
    Reads the image values of one column of one split: a path (relative ones resolved against `base_dir`) or
    `{"bytes", "path"}`; checks their header, and masks and counts the missing ones, or raises under `"error"`.
    """

    def __init__(self, split: str, column: str, base_dir: Path | None, missing_images: str):
        self.split, self.column, self.base_dir, self.missing_images = split, column, base_dir, missing_images
        self.num_given = 0
        self.num_missing = 0
        self.first_missing: str | None = None

    def __call__(self, value: Any, row: int, count: bool = True) -> str | dict | list | None:
        """The value to keep (None for a missing image); `count`: whether the row is read for the first time."""
        if isinstance(value, list):  # a post's several images
            return [self(image, row, count) for image in value]
        where = f"the {self.split} split, row {row}, column {self.column!r}"
        source = image_source(value, where)  # refuses a URL and a value that is not an image
        if source is None:
            return None
        path = value.get("path") if isinstance(value, Mapping) else str(source)
        if not isinstance(source, bytes) and self.base_dir is not None:
            path = str(self.base_dir / path)  # an absolute path stays as it is
        self.num_given += count
        problem = image_header_problem(io.BytesIO(source) if isinstance(source, bytes) else path)
        if problem is None:
            return {**value, "path": path} if isinstance(value, Mapping) else path
        if self.missing_images == "error":
            raise FileNotFoundError(f"{where}: image {path or '(bytes)'} is missing or unreadable: {problem}")
        self.num_missing += count
        self.first_missing = self.first_missing or f"{path or '(bytes)'} ({problem})"
        return None

    def check_found(self, text_only: str) -> None:
        """Logs the masked images; stops when not one of them was found (the paths or their folder are wrong)."""
        if self.num_given and self.num_missing == self.num_given:
            raise FileNotFoundError(
                f"none of the {self.num_given} images of column {self.column!r} of the {self.split} split was found "
                f"(first: {self.first_missing}); check the paths, or {text_only}"
            )
        if self.num_missing:
            logger.warning(
                "%s split, column %r: %d of %d images missing or unreadable, masked out (first: %s).",
                self.split,
                self.column,
                self.num_missing,
                self.num_given,
                self.first_missing,
            )


class ImageCounts:
    """The images of the rows read so far, per split and image column: those given, and those masked as missing."""

    def __init__(self, readers: Sequence[_ImageReader]):
        self.readers = list(readers)

    def check_found(self, text_only: str) -> None:
        """Logs the masked images; raises when not one image of a column that has some was found."""
        for reader in self.readers:
            reader.check_found(text_only)

    def report(self, text_only: str) -> None:
        """Logs the masked images of the rows read, and a column of which not one image was found, as warnings."""
        for reader in self.readers:
            try:
                reader.check_found(text_only)
            except FileNotFoundError as error:
                logger.warning("%s", error)


class _RowNormalizer:
    """
    The row function of one split (`Dataset.map` or `IterableDataset.map`, with indices): a row of the user's data
    set in the loaders' columns, its labels checked against `names` and its images read (see the module docstring).
    A row read again (a stream is read once per epoch) masks its missing images again but is not counted again.
    """

    def __init__(
        self,
        split: str,
        task: str,
        columns: Mapping[str, str],
        names: list[str],
        dataset: Dataset | IterableDataset,
        base_dir: Path | None,
        missing_images: str,
        mask_images: bool,
    ):
        self.split, self.task, self.columns = split, task, columns
        self.label_ids = {name: index for index, name in enumerate(names)}
        feature = dataset.features[LABEL_COLUMNS[task]]
        self.features = _target_features(task, dataset, names)
        # A ClassLabel's ids, read by their names (the label set may be a trained model's, in another order).
        self.source_names = getattr(feature.feature if isinstance(feature, List) else feature, "names", None)
        self.readers = {
            column: _ImageReader(split, columns[column], base_dir, missing_images) for column in IMAGE_COLUMNS
        }
        self.present = {column for column in IMAGE_COLUMNS if column in dataset.column_names and not mask_images}
        self.rows_counted = 0

    def apply(self, dataset: Dataset | IterableDataset) -> Dataset | IterableDataset:
        """`dataset` normalized: at once in memory, as its rows are read when it is an `IterableDataset`."""
        arguments = {"with_indices": True, "remove_columns": dataset.column_names, "features": self.features}
        if isinstance(dataset, IterableDataset):
            return dataset.map(self, **arguments)
        return dataset.map(self, **arguments, load_from_cache_file=False, desc=f"Reading the {self.split} split")

    def __call__(self, row: dict[str, Any], index: int) -> dict[str, Any]:
        where = {
            column: f"the {self.split} split, row {index}, column {name!r}" for column, name in self.columns.items()
        }
        count = index >= self.rows_counted
        self.rows_counted = max(self.rows_counted, index + 1)
        tokens = _words(_literal(row["tokens"]), where["tokens"])
        if self.task == "ner":
            tags = _literal(row["ner_tags"])
            if not isinstance(tags, list) or len(tags) != len(tokens):
                raise ValueError(f"{where['ner_tags']}: expected one tag per word ({len(tokens)}), got {tags!r}")
            labels = {"ner_tags": [self._label_id(tag, where["ner_tags"]) for tag in tags]}
        else:
            labels = {
                "head": _entity(_literal(row["head"]), tokens, where["head"]),
                "tail": _entity(_literal(row["tail"]), tokens, where["tail"]),
                "relation": self._label_id(row["relation"], where["relation"]),
            }
        image = row["image"] if "image" in self.present else None
        crops = _literal(row["objects"]) if "objects" in self.present else []
        if not isinstance(crops, list):
            raise ValueError(f"{where['objects']}: expected a list of crops, got {crops!r}")
        return {
            "id": str(index),
            "tokens": tokens,
            **labels,
            "image_id": _image_name(image),
            "image": self.readers["image"](_literal(image), index, count),
            "objects": [self.readers["objects"](crop, index, count) for crop in crops],
        }

    def _label_id(self, label: Any, where: str) -> int:
        """A label's id in the label set: a name, or a `ClassLabel` id read by its name."""
        if isinstance(label, int) and self.source_names is not None and 0 <= label < len(self.source_names):
            label = self.source_names[label]
        elif isinstance(label, int) and 0 <= label < len(self.label_ids):
            return label
        if label not in self.label_ids:
            raise ValueError(f"{where}: label {label!r} is not in the label set {list(self.label_ids)}")
        return self.label_ids[label]


def _words(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(word, str) for word in value):
        raise ValueError(f"{where}: expected a non-empty list of words (strings), got {value!r}")
    return value


def _entity(value: Any, tokens: list[str], where: str) -> dict[str, Any]:
    """`{"name", "start", "end"}` of an entity given as `{"start", "end"}` or MNRE's `{"name", "pos"}`."""
    span = None
    if isinstance(value, Mapping):
        span = value.get("pos") if "pos" in value else (value.get("start"), value.get("end"))
    if not (isinstance(span, (list, tuple)) and len(span) == 2 and all(isinstance(p, int) for p in span)):
        raise ValueError(f"{where}: expected {{'start': ..., 'end': ...}} word offsets, got {value!r}")
    start, end = span
    if not 0 <= start < end <= len(tokens):
        raise ValueError(f"{where}: span [{start}, {end}) is out of range for {len(tokens)} words")
    return {"name": str(value.get("name") or " ".join(tokens[start:end])), "start": start, "end": end}


def _image_name(value: Any) -> str:
    """The file name of an image value (a path or `{"bytes", "path"}`; of a list, the first), or "" without one."""
    if isinstance(value, list):
        return _image_name(value[0]) if value else ""
    path = value.get("path") if isinstance(value, Mapping) else value
    return Path(path).name if isinstance(path, str) else ""


def label_names_of(splits: DatasetDict, task: str) -> list[str]:
    """The label names of splits in the loaders' columns of `task` (every split has the same)."""
    feature = next(iter(splits.values())).features[LABEL_COLUMNS[task]]
    return (feature.feature if isinstance(feature, List) else feature).names


__all__ = [
    "COLUMN_FLAGS",
    "LABEL_COLUMNS",
    "TABLE_FORMATS",
    "TASK_COLUMNS",
    "label_names_of",
    "is_table_file",
    "load_table_dataset",
    "read_table_dataset",
    "stream_table_dataset",
    "ImageCounts",
]
