"""
Loaders for the multimodal NER (Twitter-2015/2017, UMT release; CMNER) and MNRE data sets, read in their published
formats.

The loaders return a `datasets.DatasetDict` whose `image` column holds a file path (or None; for CMNER the list of
the post's image paths) and whose `objects` column holds object-crop paths. Pixels are never stored in Arrow:
`HVPNetProcessor` decodes the files lazily.

Missing images follow one policy, `missing_images`:
- `"mask"` (default): the example is kept, the absent file becomes None (its image is masked out by the model),
  and the loader logs how many files were missing or unreadable per split.
- `"error"`: the first missing or unreadable file raises an error naming it and the data line that refers to it.
At load time a file counts as readable when it exists and PIL recognizes its header (`image_header_problem`); a
file whose pixel data turns out to be truncated is caught when it is decoded, under the same policy (`load_image`;
both live in `image_processing_hvpnet`, which reads every image of the package). An image PIL refuses as a
decompression bomb (more than twice `PIL.Image.MAX_IMAGE_PIXELS`, about 179 million pixels by default) counts as
unreadable: it is never decoded, so a hostile or broken file cannot exhaust the memory. Raise the limit to use such
images.
"""

import ast
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, IterableDataset, List, Value

from .image_processing_hvpnet import _check_policy, image_header_problem

logger = logging.getLogger(__name__)

# The NER tags of the data sets, in the order of their ids. "O" is id 0, so a word cut by truncation can be scored
# as "O".
MNER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-MISC", "I-MISC"]
# Twitter-2015 calls the miscellaneous type OTHER, Twitter-2017 calls it MISC.
MNER_ENTITY_TYPES = {"PER": "PER", "LOC": "LOC", "ORG": "ORG", "MISC": "MISC", "OTHER": "MISC"}
NO_RELATION = "None"

PathLike = str | os.PathLike
SplitPaths = PathLike | Mapping[str, PathLike]

# The names the releases give each split in file names, image and crop folders and crop maps (`valid.txt`,
# `ours_val.txt`, `img_org/val/`, `twitter_val_dict.pth`, `mre_dev_dict.pth`), first the usual one.
SPLIT_ALIASES = {"train": ("train",), "validation": ("val", "dev", "valid"), "test": ("test",)}
_SPLIT_OF_ALIAS = {alias: split for split, aliases in SPLIT_ALIASES.items() for alias in aliases}
# How a data file of each published format starts (`data_file_format`).
_FORMAT_STARTS = {"twitter": "IMGID:", "cmner": "WID:", "mnre": "{"}
# A split name as one word of a file name: `mnre_train.txt`, `ours_val.txt`, `mnre_val .txt`, `valid.txt`.
_SPLIT_WORD = re.compile(rf"(?:^|[_\-\s.])({'|'.join(_SPLIT_OF_ALIAS)})(?:$|[_\-\s.])", re.IGNORECASE)


@dataclass
class _Example:
    """One parsed example, with the line of the data file it starts on (for error messages)."""

    line: int
    tokens: list[str]
    image_file: str
    fields: dict = field(default_factory=dict)


def load_mner_dataset(
    data_dir: PathLike | None = None,
    data_files: Mapping[str, PathLike] | None = None,
    image_dir: SplitPaths | None = None,
    object_dir: SplitPaths | None = None,
    object_maps: Mapping[str, PathLike | Mapping] | None = None,
    missing_images: str = "mask",
) -> DatasetDict:
    """
    Loads Twitter-2015 / Twitter-2017 multimodal NER data in the UMT release format: blank-line separated blocks,
    each starting with `IMGID:<id>` (image `<id>.jpg`) followed by one `token<TAB>label` line per token.

    Args:
        data_dir: folder of the split files, found by their names (`train.txt`, `valid.txt`, `test.txt`; see
            `find_split_files`).
        data_files: explicit `{"train": ..., "validation": ..., "test": ...}` (relative paths are resolved in
            `data_dir` when it is given).
        image_dir: folder of the images, or one folder per split; None loads text only (`image` is None).
        object_dir: folder of the object crops, or one folder per split.
        object_maps: per split, a `torch.save`d dict (path) or a dict mapping image file name or sample index to a
            list of crop file names under `object_dir`.
        missing_images: `"mask"` or `"error"` (see the module docstring).

    Returns:
        `DatasetDict` with the splits found, columns `id` (sample index in its file), `tokens`, `ner_tags`
        (`ClassLabel` over `MNER_LABELS`; OTHER is read as MISC), `image_id`, `image` (path or None), `objects`.
    """
    return _load_ner_files(
        _read_mner_file, Value("string"), data_dir, data_files, image_dir, object_dir, object_maps, missing_images
    )


def load_cmner_dataset(
    data_dir: PathLike | None = None,
    data_files: Mapping[str, PathLike] | None = None,
    image_dir: SplitPaths | None = None,
    object_dir: SplitPaths | None = None,
    object_maps: Mapping[str, PathLike | Mapping] | None = None,
    missing_images: str = "mask",
) -> DatasetDict:
    """
    Loads CMNER (Chinese multimodal NER on Weibo posts, Ji et al. 2024) in its published format (`text/train.txt`,
    `dev.txt`, `test.txt`): blank-line separated posts, each starting with `WID:<id>`, followed by one
    `character<TAB>tag` line per character (BIO over PER, LOC, ORG, MISC), with Windows line endings. A post's
    images are the files `<id>_*.jpg` of the image folder, found in one listing of it.

    Args:
        data_dir, data_files, image_dir, missing_images: as in `load_mner_dataset`.
        object_dir, object_maps: as in `load_mner_dataset`; the crop maps are keyed by WID or by sample index.

    Returns:
        `DatasetDict` with the splits found, columns `id` (post index in its file), `tokens` (the characters),
        `ner_tags` (`ClassLabel` over `MNER_LABELS`), `image_id` (the WID), `image` (the post's image paths, sorted
        by name; an empty list for a post without images, which is masked), `objects`.
    """
    post_images = List(Value("string"))
    return _load_ner_files(
        _read_cmner_file, post_images, data_dir, data_files, image_dir, object_dir, object_maps, missing_images
    )


def load_mre_dataset(
    data_dir: PathLike | None = None,
    data_files: Mapping[str, PathLike] | None = None,
    image_dir: SplitPaths | None = None,
    object_dir: SplitPaths | None = None,
    object_maps: Mapping[str, PathLike | Mapping] | None = None,
    rel2id: PathLike | Mapping[str, int] | None = None,
    missing_images: str = "mask",
) -> DatasetDict:
    """
    Loads MNRE multimodal relation extraction data: one Python literal per line with `token` (words), `h` and `t`
    (`{"name", "pos": [start, end)}` in word offsets), `img_id` and `relation`.

    Args:
        data_dir: folder of the split files, found by their names (release file names vary: `mnre_train.txt`,
            `ours_val.txt`, `mnre_val .txt`; see `find_split_files`).
        data_files: explicit `{"train": ..., "validation": ..., "test": ...}`.
        image_dir, object_dir, object_maps, missing_images: as in `load_mner_dataset` (MNRE keeps one image folder
            per split, e.g. `img_org/train`).
        rel2id: a JSON file or dict `{relation: id}` fixing the relation ids; an unknown relation is then an error.
            Without it the names are collected from the files, sorted, with `"None"` first.

    Returns:
        `DatasetDict` with the splits found, columns `id` (record index in its file, blank lines skipped), `tokens`,
        `head` and `tail` (`name`, `start`, `end`; word offsets, end exclusive), `relation` (`ClassLabel`),
        `image_id`, `image`, `objects`.
    """
    files = _resolve_data_files(data_dir, data_files)
    parsed = {split: _read_mre_file(path) for split, path in files.items()}
    relation_names = _relation_names(rel2id, parsed, files)
    entity = {"name": Value("string"), "start": Value("int32"), "end": Value("int32")}
    features = Features(
        {
            "id": Value("string"),
            "tokens": List(Value("string")),
            "head": entity,
            "tail": entity,
            "relation": ClassLabel(names=relation_names),
            "image_id": Value("string"),
            "image": Value("string"),
            "objects": List(Value("string")),
        }
    )
    splits = {}
    for split, examples in parsed.items():
        columns = {name: [example.fields[name] for example in examples] for name in ("head", "tail", "relation")}
        splits[split] = _build_split(
            split, files[split], examples, columns, features, image_dir, object_dir, object_maps, missing_images
        )
    return DatasetDict(splits)


def _load_ner_files(
    read_file: Callable[[Path], list[_Example]],
    image_feature: Value | List,
    data_dir: PathLike | None,
    data_files: Mapping[str, PathLike] | None,
    image_dir: SplitPaths | None,
    object_dir: SplitPaths | None,
    object_maps: Mapping[str, PathLike | Mapping] | None,
    missing_images: str,
) -> DatasetDict:
    """
    The NER splits of `load_mner_dataset` / `load_cmner_dataset`, each file read by `read_file`; `image_feature` is
    an image path (`Value`) or a post's image paths (`List`).
    """
    files = _resolve_data_files(data_dir, data_files)
    features = Features(
        {
            "id": Value("string"),
            "tokens": List(Value("string")),
            "ner_tags": List(ClassLabel(names=MNER_LABELS)),
            "image_id": Value("string"),
            "image": image_feature,
            "objects": List(Value("string")),
        }
    )
    splits = {}
    for split, path in files.items():
        examples = read_file(path)
        columns = {"ner_tags": [example.fields["ner_tags"] for example in examples]}
        splits[split] = _build_split(
            split, path, examples, columns, features, image_dir, object_dir, object_maps, missing_images
        )
    return DatasetDict(splits)


def _resolve_data_files(data_dir, data_files) -> dict[str, Path]:
    if data_files is not None:
        base = Path(data_dir) if data_dir is not None else Path()
        files = {split: base / path for split, path in data_files.items()}
    elif data_dir is not None:
        files = find_split_files(data_dir)
    else:
        raise ValueError("Pass data_dir or data_files.")
    for split, path in files.items():
        if not path.is_file():
            raise FileNotFoundError(f"Data file for split {split!r} not found: {path}")
    return files


def _numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """
    `(line number, line)` of a UTF-8 text file, a leading byte-order mark dropped; CRLF lines read like LF ones.
    Bytes that are not UTF-8 are an error naming the file and the line.
    """
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as file:
        for line_no, line in enumerate(file, start=1):
            try:
                line.encode("utf-8")
            except UnicodeEncodeError as error:
                byte = ord(line[error.start]) - 0xDC00  # surrogateescape keeps an undecodable byte as U+DC80..U+DCFF
                raise ValueError(
                    f"{path}:{line_no}: byte 0x{byte:02x} at column {error.start + 1} is not UTF-8; save the file "
                    "as UTF-8"
                ) from None
            yield line_no, line


def _read_mner_file(path: Path) -> list[_Example]:
    examples: list[_Example] = []
    current: _Example | None = None

    def close_block(line_no: int) -> None:
        if current is not None and not current.tokens:
            raise ValueError(f"{path}:{current.line}: IMGID block has no token lines (block ends at line {line_no})")

    for line_no, raw_line in _numbered_lines(path):
        line = raw_line.rstrip()
        if not line:
            close_block(line_no)
            current = None
            continue
        if line.startswith("IMGID:"):
            close_block(line_no)
            current = _Example(line_no, [], line[len("IMGID:") :].strip() + ".jpg", {"ner_tags": []})
            examples.append(current)
            continue
        if current is None:
            raise ValueError(f"{path}:{line_no}: token line outside an IMGID block: {line!r}")
        token, tab, label = line.rpartition("\t")
        if not tab:
            raise ValueError(f"{path}:{line_no}: expected 'token<TAB>label', got {line!r}")
        current.tokens.append(token.strip())
        current.fields["ner_tags"].append(_normalize_bio_label(label.strip(), path, line_no))
    if not examples:
        raise ValueError(f"{path}: no IMGID block found")
    close_block(line_no + 1)
    return examples


def _read_cmner_file(path: Path) -> list[_Example]:
    """The posts of a CMNER file; each `_Example`'s `image_file` is its WID."""
    examples: list[_Example] = []
    for line_no, raw_line in _numbered_lines(path):
        line = raw_line.rstrip("\r\n")
        if not line.strip():
            continue
        if line.startswith("WID:"):
            if examples and not examples[-1].tokens:
                raise ValueError(f"{path}:{examples[-1].line}: WID header without character lines")
            wid = line[len("WID:") :].strip()
            if not wid:
                raise ValueError(f"{path}:{line_no}: WID header without an id")
            examples.append(_Example(line_no, [], wid, {"ner_tags": []}))
            continue
        if not examples:
            raise ValueError(f"{path}:{line_no}: character line before any WID header: {line!r}")
        character, tab, tag = line.rpartition("\t")
        tag = tag.strip()
        if not tab or not character:
            raise ValueError(f"{path}:{line_no}: expected 'character<TAB>tag', got {line!r}")
        if tag not in MNER_LABELS:
            raise ValueError(f"{path}:{line_no}: tag {tag!r} is not one of {MNER_LABELS}")
        examples[-1].tokens.append(character)
        examples[-1].fields["ner_tags"].append(tag)
    if not examples:
        raise ValueError(f"{path}: no WID header found")
    if not examples[-1].tokens:
        raise ValueError(f"{path}:{examples[-1].line}: WID header without character lines")
    return examples


def _normalize_bio_label(label: str, path: Path, line_no: int) -> str:
    """Checks a BIO label and maps OTHER to MISC. An `I-` tag without a preceding `B-` is kept, as conlleval does."""
    if label == "O":
        return label
    prefix, dash, entity_type = label.partition("-")
    if dash and prefix in ("B", "I") and entity_type in MNER_ENTITY_TYPES:
        return f"{prefix}-{MNER_ENTITY_TYPES[entity_type]}"
    raise ValueError(
        f"{path}:{line_no}: label {label!r} is not BIO over {sorted(MNER_ENTITY_TYPES)} (expected O, B-TYPE or I-TYPE)"
    )


def _read_mre_file(path: Path) -> list[_Example]:
    examples = []
    for line_no, raw_line in _numbered_lines(path):
        line = raw_line.strip()
        if not line:
            continue
        try:
            record = ast.literal_eval(line)
        except (ValueError, SyntaxError, MemoryError, RecursionError) as error:
            raise ValueError(f"{path}:{line_no}: not a Python literal: {error}") from error
        examples.append(_parse_mre_record(record, path, line_no))
    if not examples:
        raise ValueError(f"{path}: no records found")
    overlapping = [
        example.line for example in examples if _spans_overlap(example.fields["head"], example.fields["tail"])
    ]
    if overlapping:
        logger.warning(
            "%s: %d of %d records have overlapping head and tail spans (first: line %d); their entity markers nest.",
            path,
            len(overlapping),
            len(examples),
            overlapping[0],
        )
    return examples


def _spans_overlap(head: Mapping, tail: Mapping) -> bool:
    return head["start"] < tail["end"] and tail["start"] < head["end"]


def _parse_mre_record(record, path: Path, line_no: int) -> _Example:
    where = f"{path}:{line_no}"
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a dict, got {type(record).__name__}")
    for key in ("token", "h", "t", "img_id", "relation"):
        if key not in record:
            raise ValueError(f"{where}: field {key!r} is missing")
    tokens = record["token"]
    if not isinstance(tokens, list) or not all(isinstance(token, str) for token in tokens):
        raise ValueError(f"{where}: field 'token' must be a list of strings")
    entities = {}
    for key, column in (("h", "head"), ("t", "tail")):
        entity = record[key]
        pos = entity.get("pos") if isinstance(entity, dict) else None
        if not (isinstance(pos, (list, tuple)) and len(pos) == 2 and all(isinstance(p, int) for p in pos)):
            raise ValueError(f"{where}: field {key!r} must be {{'name': ..., 'pos': [start, end]}}, got {entity!r}")
        start, end = pos
        if not 0 <= start < end <= len(tokens):
            raise ValueError(f"{where}: {key} span [{start}, {end}) is out of range for {len(tokens)} tokens")
        entities[column] = {"name": str(entity.get("name", " ".join(tokens[start:end]))), "start": start, "end": end}
    return _Example(line_no, tokens, str(record["img_id"]), {**entities, "relation": str(record["relation"])})


def _relation_names(rel2id, parsed: dict[str, list[_Example]], files: dict[str, Path]) -> list[str]:
    if rel2id is None:
        found = {example.fields["relation"] for examples in parsed.values() for example in examples}
        return [NO_RELATION] + sorted(found - {NO_RELATION})
    if not isinstance(rel2id, Mapping):
        with open(rel2id, encoding="utf-8-sig") as file:
            rel2id = json.load(file)
    ids = sorted(rel2id.values())
    if ids != list(range(len(ids))):
        raise ValueError(f"rel2id ids must be 0..{len(ids) - 1} without gaps, got {ids}")
    names = sorted(rel2id, key=rel2id.get)
    for split, examples in parsed.items():
        for example in examples:
            if example.fields["relation"] not in rel2id:
                raise ValueError(
                    f"{files[split]}:{example.line}: relation {example.fields['relation']!r} is not in rel2id"
                )
    return names


def data_file_format(path: PathLike) -> str:
    """
    The published format of the data file `path`, told by its first line that is not blank: `"twitter"`
    (Twitter-2015/2017, `IMGID:` blocks), `"cmner"` (`WID:` headers) or `"mnre"` (one Python literal per line); the
    key of its loader in `LOADER_OF_FORMAT`.
    """
    with open(path, encoding="utf-8-sig", errors="replace") as file:
        first_line = next((line.strip() for line in file if line.strip()), "")
    for name, start in _FORMAT_STARTS.items():
        if first_line.startswith(start):
            return name
    raise ValueError(
        f"{path}: starts neither with 'IMGID:' (Twitter) nor 'WID:' (CMNER) nor '{{' (MNRE): {first_line!r}"
    )


def split_of_alias(name: str) -> str | None:
    """The split (`train`, `validation`, `test`) that a release calls `name` (`val`, `dev`, `valid`, ...), or None."""
    return _SPLIT_OF_ALIAS.get(name)


def split_of_file(path: PathLike) -> str | None:
    """The split (`train`, `validation`, `test`) a file name names as one word (`ours_val.txt`), or None."""
    match = _SPLIT_WORD.search(Path(path).stem)
    return split_of_alias(match.group(1).lower()) if match else None


def find_split_files(data_dir: PathLike) -> dict[str, Path]:
    """
    `{split: file}`, in the order train, validation, test, of the `.txt` files in `data_dir` whose names name a split
    (see `split_of_file`): the Twitter releases' `train.txt`, `valid.txt`, `test.txt`, MNRE's `mnre_train.txt`,
    `ours_dev.txt`, `mnre_val .txt`. Two files of one split are an error naming them.
    """
    candidates: dict[str, list[Path]] = {}
    for path in sorted(Path(data_dir).glob("*.txt")):
        split = split_of_file(path)
        if split is not None:
            candidates.setdefault(split, []).append(path)
    if not candidates:
        raise FileNotFoundError(
            f"no data file of a split in {data_dir}: a .txt file named by one of {list(_SPLIT_OF_ALIAS)} as a word "
            "of its name (train.txt, valid.txt, mnre_test.txt), or pass data_files"
        )
    for split, paths in candidates.items():
        if len(paths) > 1:
            raise ValueError(
                f"Several files in {data_dir} look like the {split} split: {[p.name for p in paths]}; "
                "pass data_files explicitly."
            )
    return {split: candidates[split][0] for split in SPLIT_ALIASES if split in candidates}


def split_folders(folder: PathLike | None) -> PathLike | dict[str, str] | None:
    """
    `{split: folder/<split name>[/crops]}` when `folder` is laid out per split as the image and crop releases are
    (`img_org/{train,val,test}/`, `img_vg/{train,val,test}/crops/`), else `folder` itself (one folder for all).
    """
    if folder is None:
        return None
    per_split = {}
    for split, aliases in SPLIT_ALIASES.items():
        for alias in aliases:
            candidate = Path(folder) / alias
            candidate = candidate / "crops" if (candidate / "crops").is_dir() else candidate
            if candidate.is_dir():
                per_split[split] = str(candidate)
                break
    return per_split or folder


def find_object_maps(folder: PathLike) -> dict[str, str]:
    """The crop maps `*_{train,val,test}_dict.pth` (or `dev`, `valid`) in `folder`, per split."""
    maps = {}
    for split, aliases in SPLIT_ALIASES.items():
        for alias in aliases:
            found = sorted(Path(folder).glob(f"*_{alias}_dict.pth"))
            if found:
                maps[split] = str(found[0])
                break
    if not maps:
        raise FileNotFoundError(f"no crop map *_{{train,val,test}}_dict.pth in {folder}")
    return maps


def find_release_layout(
    image_dir: PathLike | None = None, object_dir: PathLike | None = None, object_map_dir: PathLike | None = None
) -> dict[str, Any]:
    """
    The `image_dir`, `object_dir` and `object_maps` keyword arguments of `load_mner_dataset` / `load_mre_dataset`
    for a data set laid out as it was published: image and crop folders flat or per split (see `split_folders`),
    and with crops, the crop maps of every split, found in `object_map_dir` (see `find_object_maps`).
    """
    if object_dir is not None and object_map_dir is None:
        raise ValueError(f"the crops in {object_dir} need the folder of their *_dict.pth crop maps")
    return {
        "image_dir": split_folders(image_dir),
        "object_dir": split_folders(object_dir),
        "object_maps": find_object_maps(object_map_dir) if object_dir is not None else None,
    }


def find_file_layout(
    data_file: PathLike,
    image_dir: PathLike | None = None,
    object_dir: PathLike | None = None,
    object_map: PathLike | None = None,
) -> dict[str, Any]:
    """
    The keyword arguments of `load_mner_dataset` / `load_mre_dataset` that read one data file of a published data set
    as their `test` split, with the images and crops of the file's split, which its name gives (`ours_test.txt`,
    `valid.txt`; see `split_of_file`): of a folder laid out per split (see `split_folders`), the folder of that split;
    with crops, `object_map`, or else that split's crop map next to the file (see `find_object_maps`).
    """
    split = split_of_file(data_file)
    if object_map is None and object_dir is not None:
        try:
            maps = find_object_maps(Path(data_file).parent)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"{error}; name the crop map of {data_file} with object_map") from error
        object_map = _of_split(maps, split, data_file, "the crop maps next to it are")
    return {
        "data_files": {"test": data_file},
        "image_dir": _of_split(split_folders(image_dir), split, data_file, f"image_dir {image_dir} is"),
        "object_dir": _of_split(split_folders(object_dir), split, data_file, f"object_dir {object_dir} is"),
        "object_maps": None if object_map is None else {"test": object_map},
    }


def _of_split(found: Any, split: str | None, data_file: PathLike, what: str) -> Any:
    """The entry of `split` when `found` is per split (a dict), else `found` itself; `what` names `found`."""
    if not isinstance(found, dict):
        return found
    if split not in found:
        named = "not among them" if split else "not named in its file name"
        raise ValueError(
            f"{what} laid out per split ({', '.join(sorted(found))}), but the split of {data_file} is {named}; "
            "give the folder or crop map of its split"
        )
    return found[split]


def _split_path(paths: SplitPaths | None, split: str, what: str) -> Path | None:
    if paths is None or isinstance(paths, (str, os.PathLike)):
        return None if paths is None else Path(paths)
    if split not in paths:
        raise ValueError(f"{what} has no entry for split {split!r} (it has {sorted(paths)})")
    return Path(paths[split])


def _build_split(
    split: str,
    data_file: Path,
    examples: list[_Example],
    columns: dict[str, list],
    features: Features,
    image_dir: SplitPaths | None,
    object_dir: SplitPaths | None,
    object_maps: Mapping[str, PathLike | Mapping] | None,
    missing_images: str,
) -> Dataset:
    _check_policy(missing_images)
    checker = _ImageChecker(missing_images)
    image_root = _split_path(image_dir, split, "image_dir")
    if isinstance(features["image"], List):
        images = _post_images(split, data_file, examples, image_root, checker)
    else:
        images = [
            checker(None if image_root is None else image_root / example.image_file, f"{data_file}:{example.line}")
            for example in examples
        ]
    crop_lists = _crop_lists(split, data_file, examples, object_dir, object_maps)
    objects = [
        [checker(path, f"{data_file}:{example.line}") for path in crops]
        for example, crops in zip(examples, crop_lists, strict=True)
    ]
    listed = [path for crops in crop_lists for path in crops]
    if listed and all(path is None for crops in objects for path in crops):
        # Masking some missing crops is a counted fallback; masking every one means the folder is wrong.
        raise FileNotFoundError(
            f"none of the {len(listed)} object crops that the crop map of the {split} split lists was found in "
            f"object_dir {_split_path(object_dir, split, 'object_dir')} (looked for e.g. {listed[0]}); check the "
            "folder, or leave object_dir and the crop maps out to use the images without crops"
        )
    if checker.num_missing:
        logger.warning(
            "%s split (%s): %d of %d image files missing or unreadable, masked out (first: %s).",
            split,
            data_file,
            checker.num_missing,
            checker.num_checked,
            checker.first_missing,
        )
    data = {
        "id": [str(index) for index in range(len(examples))],
        "tokens": [example.tokens for example in examples],
        **columns,
        "image_id": [example.image_file for example in examples],
        "image": images,
        "objects": objects,
    }
    return Dataset.from_dict(data, features=features, split=split)


def _post_images(
    split: str, data_file: Path, examples: list[_Example], image_root: Path | None, checker: "_ImageChecker"
) -> list[list[str]]:
    """
    Per post (its WID in `image_file`), the readable files `<WID>_*.jpg` of `image_root`, sorted by name; a post
    without any is a missing image under the checker's policy (an empty list, counted and logged, or an error).
    """
    if image_root is None:
        return [[] for _ in examples]
    files_of_post = _files_by_post(image_root)
    images, without = [], []
    for example in examples:
        where = f"{data_file}:{example.line}"
        paths = [checker(image_root / name, where) for name in files_of_post.get(example.image_file, [])]
        if not paths:
            if checker.missing_images == "error":
                raise FileNotFoundError(
                    f"{where}: post {example.image_file} has no image file {example.image_file}_*.jpg in {image_root}"
                )
            without.append(example)
        images.append([path for path in paths if path is not None])
    if without:
        logger.warning(
            "%s split (%s): %d of %d posts have no image file <WID>_*.jpg in %s, masked out (first: WID %s, line %d).",
            split,
            data_file,
            len(without),
            len(examples),
            image_root,
            without[0].image_file,
            without[0].line,
        )
    return images


def _files_by_post(image_root: Path) -> dict[str, list[str]]:
    """
    `{WID: sorted names}` of the `.jpg` files of `image_root`, from one listing: a file `<WID>_<suffix>.jpg` is filed
    under every prefix of its name that an underscore ends, so a WID finds exactly the names that start with `<WID>_`.
    """
    if not image_root.is_dir():
        raise FileNotFoundError(f"image_dir {image_root} is not a folder")
    files_of_post: dict[str, list[str]] = {}
    for name in sorted(entry.name for entry in os.scandir(image_root) if entry.name.lower().endswith(".jpg")):
        for position, character in enumerate(name):
            if character == "_":
                files_of_post.setdefault(name[:position], []).append(name)
    return files_of_post


class _ImageChecker:
    """Checks that image files exist and have a header PIL accepts; remembers results, counts failures."""

    def __init__(self, missing_images: str):
        self.missing_images = missing_images
        self.num_checked = 0
        self.num_missing = 0
        self.first_missing: str | None = None
        self._problems: dict[Path, str | None] = {}

    def __call__(self, path: Path | None, referenced_at: str) -> str | None:
        if path is None:
            return None
        self.num_checked += 1
        if path not in self._problems:
            self._problems[path] = image_header_problem(path)
        problem = self._problems[path]
        if problem is None:
            return str(path)
        if self.missing_images == "error":
            raise FileNotFoundError(f"{referenced_at}: image file {path} is missing or unreadable: {problem}")
        self.num_missing += 1
        self.first_missing = self.first_missing or f"{path} ({problem})"
        return None


def _crop_lists(
    split: str,
    data_file: Path,
    examples: list[_Example],
    object_dir: SplitPaths | None,
    object_maps: Mapping[str, PathLike | Mapping] | None,
) -> list[list[Path]]:
    """Per example, the paths of its object crops (empty when the map has no entry for it)."""
    if object_maps is None or split not in object_maps:
        return [[] for _ in examples]
    crop_root = _split_path(object_dir, split, "object_dir")
    if crop_root is None:
        raise ValueError("object_maps needs object_dir, the folder the crop file names are relative to")
    source = object_maps[split]
    crop_map = source if isinstance(source, Mapping) else torch.load(source, weights_only=True)
    where = source if not isinstance(source, Mapping) else f"object map of split {split!r}"
    keys = _crop_map_keys(crop_map, examples, where)
    lists = []
    for key in keys:
        crops = crop_map.get(key, [])
        if not isinstance(crops, (list, tuple)) or not all(isinstance(crop, str) for crop in crops):
            raise ValueError(f"{where}: entry {key!r} must be a list of crop file names, got {crops!r}")
        lists.append([crop_root / crop for crop in crops])
    return lists


def _crop_map_keys(crop_map: Mapping, examples: list[_Example], where) -> Sequence:
    """
    Finds how a crop map is keyed and returns, per example, the key to look up. Maps keyed by image file name are
    recognized when a key matches an example's image; maps keyed by sample index have int (or all-digit) keys.
    """
    if not crop_map:
        return [None] * len(examples)
    image_files = [example.image_file for example in examples]
    if any(key in crop_map for key in image_files):
        return image_files
    if all(isinstance(key, int) for key in crop_map):
        indices: Sequence = range(len(examples))
    elif all(isinstance(key, str) and key.isdigit() for key in crop_map):
        indices = [str(index) for index in range(len(examples))]
    else:
        raise ValueError(f"{where}: its keys match neither the image file names nor sample indices of the split")
    largest = max(int(key) for key in crop_map)
    if largest >= len(examples):
        raise ValueError(f"{where}: keyed by sample index, but index {largest} >= {len(examples)} examples")
    return indices


# The loader of each published format (`data_file_format`); MNRE's is the relation task's.
LOADER_OF_FORMAT = {"twitter": load_mner_dataset, "cmner": load_cmner_dataset, "mnre": load_mre_dataset}


def labels_on_model_ids(examples: Dataset, column: str, id2label: Mapping[int, str], model: str) -> Dataset:
    """
    `examples` with the labels of `column` (a `ClassLabel`, or a list of them for NER tags) re-encoded by name onto
    the ids of the model's `id2label`, so that a model's ids are read with its own label names. A label of the data
    that the model does not know is an error naming it: the model can never predict it, so its scores would be
    wrong. (`Dataset.align_labels_with_mapping` is not used: it fails on a list of labels and matches names
    case-insensitively.) A streamed split (`IterableDataset`) passes only when its labels are already the model's:
    re-encoding it would read the whole stream ahead.
    """
    feature = examples.features[column]
    is_list = isinstance(feature, List)
    names = (feature.feature if is_list else feature).names
    model_names = [id2label[index] for index in range(len(id2label))]
    if names == model_names:
        return examples
    if isinstance(examples, IterableDataset):
        raise ValueError(
            f"the streamed {examples.split} split has the labels {names} in {column!r}, not those of the model "
            f"{model} ({model_names}) in their order; stream it with the model's labels (`stream_table_dataset`'s "
            "label_names)"
        )
    used = {tag for tags in examples[column] for tag in tags} if is_list else set(examples[column])
    unknown = sorted({names[index] for index in used} - set(model_names))
    if unknown:
        raise ValueError(
            f"the {examples.split} split has labels {unknown} that the model {model} does not know (its labels: "
            f"{model_names}); evaluate or train it on data of its own labels"
        )
    new_ids = [model_names.index(name) if name in model_names else -1 for name in names]
    features = examples.features.copy()
    features[column] = List(ClassLabel(names=model_names)) if is_list else ClassLabel(names=model_names)

    def encode(batch: dict[str, list]) -> dict[str, list]:
        if is_list:
            return {column: [[new_ids[tag] for tag in tags] for tags in batch[column]]}
        return {column: [new_ids[label] for label in batch[column]]}

    return examples.map(encode, batched=True, features=features, desc="Labels on the model's ids")


def check_images_found(
    examples: Dataset, source: str, image_dir: str | os.PathLike, setting: str, text_only: str
) -> None:
    """
    Stops when not a single image of `examples` (read from `source`) was found in `image_dir`, given as `setting`:
    the folder is wrong.
    Masking some missing files is a counted fallback (see `hvpnet_hf.loading`); masking all of them would silently
    give text-only results. `text_only` says how to ask for those.
    """
    if len(examples) and not any(examples["image"]):  # no path, nor a post with an image (CMNER's lists)
        first = examples[0]["image_id"]
        looked_for = f"{first}_*.jpg" if isinstance(examples.features["image"], List) else first
        raise FileNotFoundError(
            f"none of the {len(examples)} images of {source} was found in {setting} {image_dir} "
            f"(looked for e.g. {Path(image_dir) / looked_for}); check the folder, or {text_only}"
        )


def check_images_found_in_splits(
    splits: Mapping[str, Dataset], image_dir: SplitPaths, setting: str, text_only: str
) -> None:
    """`check_images_found` for every split of `splits`, loaded with `image_dir` (one folder, or one per split as
    `find_release_layout` gives them)."""
    for split, examples in splits.items():
        check_images_found(examples, f"the {split} split", _split_path(image_dir, split, setting), setting, text_only)


__all__ = [
    "LOADER_OF_FORMAT",
    "MNER_LABELS",
    "NO_RELATION",
    "SPLIT_ALIASES",
    "check_images_found",
    "check_images_found_in_splits",
    "data_file_format",
    "find_file_layout",
    "find_object_maps",
    "find_release_layout",
    "find_split_files",
    "labels_on_model_ids",
    "load_cmner_dataset",
    "load_mner_dataset",
    "load_mre_dataset",
    "split_folders",
    "split_of_alias",
    "split_of_file",
]
