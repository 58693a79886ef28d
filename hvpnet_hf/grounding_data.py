"""
Grounded multimodal NER data (Yu et al., ACL 2023): Twitter-GMNER (NUSTM's `Twitter10000/` and `Twitter10000_v2.0/`)
and its fine-grained types (FMNERG, NUSTM's `txt_fine/`), read in their published formats, and the candidate regions
a grounding model chooses an entity's region from.

- **Text:** `IMGID:<id>` blocks as in Twitter-2015/2017, one line per word: `word<TAB>tag` for Twitter-GMNER (BIO over
  PER, LOC, ORG, OTHER; OTHER is read as MISC, as `load_mner_dataset` reads it, so the labels are `MNER_LABELS`),
  `word<TAB>coarse tag<TAB>fine tag` for FMNERG (`FMNERG_TYPES`). The id is kept whole, `O_` prefix included: the
  image is `<id>.jpg` and its boxes `<id>.xml`, as NUSTM's own code names them.
- **Boxes:** `xml/<id>.xml`, a Pascal VOC file: each `<object>`'s `<name>` is the surface string of an entity of the
  tweet (its words joined by one space, compared exactly, as NUSTM's code joins them), its `<bndbox>` a box in the
  image's pixels. An entity keeps every box of its string; an entity whose string names no box, or a tweet without a
  box file, is ungroundable (its region is none).
- **Candidates:** the regions a model chooses from are the object crops with their boxes: the crops and crop map of
  `hvpnet-extract-objects` and the boxes file next to them (`candidate_boxes_file`), or boxes given by the user. At most
  `num_candidates` are kept per image, best first.

Malformed input is an error naming its file and line: XML that does not parse, a `<size>`, `<name>` or `<bndbox>`
that is missing or not a number, a box outside its image, a tag outside the data set's set.
"""

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from xml.parsers import expat

import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Value
from torchvision.ops import box_iou

from .loading import (
    MNER_ENTITY_TYPES,
    MNER_LABELS,
    PathLike,
    SplitPaths,
    _build_split,
    _Example,
    _numbered_lines,
    _resolve_data_files,
)
from .metrics.gmner_f1 import IOU_THRESHOLD
from .output_files import atomic_write
from .pipelines import bio_entities

logger = logging.getLogger(__name__)

GMNER_ENTITY_TYPES = ("PER", "LOC", "ORG", "OTHER")
# FMNERG's 8 coarse types and the 51 fine types under them, as its release names them.
FMNERG_TYPES = {
    "location": ("city", "country", "state", "continent", "location_other", "park", "road"),
    "building": ("building_other", "cultural_place", "entertainment_place", "sports_facility"),
    "organization": (
        "company",
        "educational_institution",
        "band",
        "government_agency",
        "news_agency",
        "organization_other",
        "political_party",
        "social_organization",
        "sports_league",
        "sports_team",
    ),
    "person": (
        "politician",
        "musician",
        "actor",
        "artist",
        "athlete",
        "author",
        "businessman",
        "character",
        "coach",
        "director",
        "intellectual",
        "journalist",
        "person_other",
    ),
    "other": ("animal", "award", "medical_thing", "website", "ordinance"),
    "art": ("art_other", "film_and_television_works", "magazine", "music", "written_work"),
    "event": ("event_other", "festival", "sports_event"),
    "product": ("brand_name_products", "game", "product_other", "software"),
}
FMNERG_TAG_COLUMNS = ("coarse", "fine")
# H-Index (Yu et al. 2023) grounds each entity in the 16 best VinVL detections of its image.
DEFAULT_NUM_CANDIDATES = 16

# A box: `[xmin, ymin, xmax, ymax]` in the pixels of the original image.
BOX = List(Value("float32"))
ENTITY = {"start": Value("int32"), "end": Value("int32"), "type": Value("string"), "text": Value("string")}


def bio_labels(entity_types: Sequence[str]) -> list[str]:
    """`["O", "B-<type>", "I-<type>", ...]` for `entity_types`, in their order."""
    return ["O"] + [f"{prefix}-{entity_type}" for entity_type in entity_types for prefix in ("B", "I")]


def load_gmner_dataset(
    data_dir: PathLike | None = None,
    data_files: Mapping[str, PathLike] | None = None,
    *,
    xml_dir: PathLike,
    image_dir: SplitPaths | None = None,
    object_dir: SplitPaths | None = None,
    object_maps: Mapping[str, PathLike | Mapping] | None = None,
    candidate_boxes: Mapping[str, PathLike | Mapping] | None = None,
    num_candidates: int = DEFAULT_NUM_CANDIDATES,
    missing_images: str = "mask",
) -> DatasetDict:
    """
    Loads Twitter-GMNER (either version) with every entity's gold boxes and every image's candidate regions.

    Args:
        data_dir: the release's `txt/` folder (`train.txt`, `dev.txt`, `test.txt`; see `find_split_files`).
        data_files: explicit `{"train": ..., "validation": ..., "test": ...}` (relative to `data_dir` when given).
        xml_dir: the release's `xml/` folder of `<id>.xml` box files.
        image_dir, object_dir, object_maps, missing_images: as in `load_mner_dataset`.
        candidate_boxes: per split, a JSON file (see `save_candidate_boxes`) or a dict mapping image file name to the
            boxes of its candidates, best first; with crop maps, one box per listed crop, in the same order.
        num_candidates: the most candidates kept per image (the first ones); crops beyond them are dropped too.

    Returns:
        `DatasetDict` with the columns of `load_mner_dataset` (`ner_tags` over `MNER_LABELS`) plus `entities` (per
        entity: `start`, `end` (word offsets, end exclusive), `type`, `text` (the surface string) and `boxes`, its
        gold boxes `[xmin, ymin, xmax, ymax]` in image pixels, empty when ungroundable) and `candidate_boxes` (per
        image, its candidates' boxes, aligned with `objects` when crops are given). Ungroundable entities are
        counted and logged per split (`grounding_counts`).
    """
    entity_types = {name: MNER_ENTITY_TYPES[name] for name in GMNER_ENTITY_TYPES}
    text_format = _TextFormat(num_columns=2, tag_column=1, entity_types=entity_types, labels=MNER_LABELS)
    sources = {"image_dir": image_dir, "object_dir": object_dir, "object_maps": object_maps}
    return _load(text_format, data_dir, data_files, xml_dir, sources, candidate_boxes, num_candidates, missing_images)


def load_fmnerg_dataset(
    data_dir: PathLike | None = None,
    data_files: Mapping[str, PathLike] | None = None,
    *,
    xml_dir: PathLike,
    tag_column: str = "fine",
    image_dir: SplitPaths | None = None,
    object_dir: SplitPaths | None = None,
    object_maps: Mapping[str, PathLike | Mapping] | None = None,
    candidate_boxes: Mapping[str, PathLike | Mapping] | None = None,
    num_candidates: int = DEFAULT_NUM_CANDIDATES,
    missing_images: str = "mask",
) -> DatasetDict:
    """
    Loads FMNERG (`txt_fine/`: `word<TAB>coarse tag<TAB>fine tag` lines in `IMGID:` blocks) on Twitter-GMNER's boxes.

    Args:
        tag_column: `"fine"` (the 51 fine types) or `"coarse"` (the 8 coarse types) of `FMNERG_TYPES`.
        data_dir, data_files, xml_dir, image_dir, object_dir, object_maps, candidate_boxes, num_candidates,
            missing_images: as in `load_gmner_dataset` (`xml_dir` is Twitter-GMNER v2.0's `xml/`).

    Returns:
        `DatasetDict` with the columns of `load_gmner_dataset`, `ner_tags` over `bio_labels` of the column's types.
    """
    if tag_column not in FMNERG_TAG_COLUMNS:
        raise ValueError(f"tag_column must be one of {FMNERG_TAG_COLUMNS}, got {tag_column!r}")
    if tag_column == "coarse":
        names = list(FMNERG_TYPES)
    else:
        names = [fine for fines in FMNERG_TYPES.values() for fine in fines]
    text_format = _TextFormat(
        num_columns=3,
        tag_column=1 + FMNERG_TAG_COLUMNS.index(tag_column),
        entity_types={name: name for name in names},
        labels=bio_labels(names),
    )
    sources = {"image_dir": image_dir, "object_dir": object_dir, "object_maps": object_maps}
    return _load(text_format, data_dir, data_files, xml_dir, sources, candidate_boxes, num_candidates, missing_images)


@dataclass(frozen=True)
class _TextFormat:
    """How the word lines of a release read: `num_columns` tab-separated columns, the tags in column `tag_column`,
    BIO over the keys of `entity_types` (each type renamed to its value), the labels `labels`."""

    num_columns: int
    tag_column: int
    entity_types: Mapping[str, str]
    labels: list[str]


def _load(
    text_format: _TextFormat,
    data_dir: PathLike | None,
    data_files: Mapping[str, PathLike] | None,
    xml_dir: PathLike,
    sources: dict,
    candidate_boxes: Mapping[str, PathLike | Mapping] | None,
    num_candidates: int,
    missing_images: str,
) -> DatasetDict:
    """The splits of `load_gmner_dataset` in `text_format`, their entities grounded in `xml_dir`'s boxes; `sources`
    are the image and crop arguments of `load_mner_dataset`."""
    files = _resolve_data_files(data_dir, data_files)
    if num_candidates < 1:
        raise ValueError(f"num_candidates must be at least 1, got {num_candidates}")
    if not Path(xml_dir).is_dir():
        raise NotADirectoryError(f"xml_dir {xml_dir} is not a folder")
    features = Features(
        {
            "id": Value("string"),
            "tokens": List(Value("string")),
            "ner_tags": List(ClassLabel(names=text_format.labels)),
            "entities": List({**ENTITY, "boxes": List(BOX)}),
            "candidate_boxes": List(BOX),
            "image_id": Value("string"),
            "image": Value("string"),
            "objects": List(Value("string")),
        }
    )
    splits = {}
    for split, path in files.items():
        examples = _read_tagged_file(path, text_format)
        entities = _ground_entities(split, examples, Path(xml_dir))
        candidates = _candidate_lists(split, examples, candidate_boxes)
        columns = {"ner_tags": [example.fields["ner_tags"] for example in examples], "entities": entities}
        columns["candidate_boxes"] = candidates
        data = _build_split(split, path, examples, columns, features, missing_images=missing_images, **sources)
        splits[split] = _keep_candidates(data, num_candidates, candidate_boxes is not None)
        counts = grounding_counts(splits[split])
        logger.info(
            "%s split (%s): %d entities, %d groundable (%d boxes), %d ungroundable (their string names no box).",
            split,
            path,
            counts["entities"],
            counts["groundable"],
            counts["boxes"],
            counts["ungroundable"],
        )
    return DatasetDict(splits)


def _read_tagged_file(path: Path, text_format: _TextFormat) -> list[_Example]:
    """The `IMGID:` blocks of `path`, their word lines read in `text_format` (the tags checked and renamed)."""
    examples: list[_Example] = []
    for line_no, raw_line in _numbered_lines(path):
        line = raw_line.rstrip("\r\n")
        if not line.strip():
            continue
        if line.startswith("IMGID:"):
            if examples and not examples[-1].tokens:
                raise ValueError(f"{path}:{examples[-1].line}: IMGID block has no word lines")
            image_id = line[len("IMGID:") :].strip()
            if not image_id:
                raise ValueError(f"{path}:{line_no}: IMGID line without an id")
            examples.append(_Example(line_no, [], f"{image_id}.jpg", {"ner_tags": []}))
            continue
        if not examples:
            raise ValueError(f"{path}:{line_no}: word line before any IMGID line: {line!r}")
        columns = line.split("\t")
        if len(columns) != text_format.num_columns or not columns[0]:
            raise ValueError(
                f"{path}:{line_no}: expected {text_format.num_columns} tab-separated columns (word, tags), got {line!r}"
            )
        tag = _checked_tag(columns[text_format.tag_column].strip(), text_format.entity_types, path, line_no)
        examples[-1].tokens.append(columns[0])
        examples[-1].fields["ner_tags"].append(tag)
    if not examples:
        raise ValueError(f"{path}: no IMGID block found")
    if not examples[-1].tokens:
        raise ValueError(f"{path}:{examples[-1].line}: IMGID block has no word lines")
    return examples


def _checked_tag(tag: str, entity_types: Mapping[str, str], path: Path, line_no: int) -> str:
    if tag == "O":
        return tag
    prefix, dash, entity_type = tag.partition("-")
    if dash and prefix in ("B", "I") and entity_type in entity_types:
        return f"{prefix}-{entity_types[entity_type]}"
    raise ValueError(f"{path}:{line_no}: tag {tag!r} is not O, B-TYPE or I-TYPE over the types {list(entity_types)}")


def _ground_entities(split: str, examples: list[_Example], xml_dir: Path) -> list[list[dict]]:
    """Per example, its entities with the boxes their strings name in the example's box file."""
    entities, num_files, unmatched = [], 0, []
    boxes_of_image: dict[str, dict[str, list[list[float]]]] = {}
    for example in examples:
        xml_path = xml_dir / f"{Path(example.image_file).stem}.xml"
        if example.image_file not in boxes_of_image:
            boxes_of_image[example.image_file] = read_voc_boxes(xml_path) if xml_path.is_file() else {}
            num_files += xml_path.is_file()
        boxes = boxes_of_image[example.image_file]
        found = []
        for entity_type, first, last in bio_entities(example.fields["ner_tags"]):
            text = " ".join(example.tokens[first : last + 1])
            found.append(
                {"start": first, "end": last + 1, "type": entity_type, "text": text, "boxes": boxes.get(text, [])}
            )
        unmatched += [(xml_path, name) for name in boxes if name not in {entity["text"] for entity in found}]
        entities.append(found)
    if any(entities) and not num_files:
        raise FileNotFoundError(
            f"none of the box files of the {len(examples)} tweets of the {split} split is in xml_dir {xml_dir} (looked "
            f"for e.g. {xml_dir / Path(examples[0].image_file).stem}.xml); give the release's xml/ folder"
        )
    if unmatched:
        logger.warning(
            "%s split: %d box names match no entity string of their tweet; those boxes are not used (first: %r in %s).",
            split,
            len(unmatched),
            unmatched[0][1],
            unmatched[0][0],
        )
    return entities


@dataclass
class _Element:
    """An XML element with the line it starts on."""

    tag: str
    line: int
    text: str = ""
    children: list["_Element"] = field(default_factory=list)

    def child(self, tag: str, path: Path) -> "_Element":
        for child in self.children:
            if child.tag == tag:
                return child
        raise ValueError(f"{path}:{self.line}: <{self.tag}> has no <{tag}>")

    def number(self, tag: str, path: Path) -> float:
        child = self.child(tag, path)
        try:
            return float(child.text)
        except ValueError:
            raise ValueError(f"{path}:{child.line}: <{tag}> is {child.text.strip()!r}, not a number") from None


def _parse_xml(path: Path) -> _Element:
    """The root element of the XML file `path`, each element with its line; XML that does not parse is an error
    naming the file and line."""
    parser = expat.ParserCreate()
    stack = [_Element("", 0)]

    def start(tag: str, attributes: dict) -> None:
        element = _Element(tag, parser.CurrentLineNumber)
        stack[-1].children.append(element)
        stack.append(element)

    def end(tag: str) -> None:
        stack.pop()

    def text(data: str) -> None:
        stack[-1].text += data

    parser.StartElementHandler, parser.EndElementHandler, parser.CharacterDataHandler = start, end, text
    with open(path, "rb") as file:
        try:
            parser.ParseFile(file)
        except expat.ExpatError as error:
            raise ValueError(f"{path}:{error.lineno}: not well-formed XML: {expat.ErrorString(error.code)}") from None
    return stack[0].children[0]


def read_voc_boxes(path: PathLike) -> dict[str, list[list[float]]]:
    """
    `{name: [[xmin, ymin, xmax, ymax], ...]}` of a Pascal VOC file: every `<object>`'s box under its `<name>`, in the
    file's order. A box must lie inside the `<size>` of the image and have an area.
    """
    path = Path(path)
    annotation = _parse_xml(path)
    size = annotation.child("size", path)
    width, height = size.number("width", path), size.number("height", path)
    boxes: dict[str, list[list[float]]] = {}
    for element in annotation.children:
        if element.tag != "object":
            continue
        name = element.child("name", path).text
        if not name.strip():
            raise ValueError(f"{path}:{element.child('name', path).line}: <name> is empty")
        bndbox = element.child("bndbox", path)
        box = [bndbox.number(key, path) for key in ("xmin", "ymin", "xmax", "ymax")]
        if not (0 <= box[0] < box[2] <= width and 0 <= box[1] < box[3] <= height):
            raise ValueError(
                f"{path}:{bndbox.line}: box {box} of {name!r} is empty or outside the {width:g} x {height:g} image"
            )
        boxes.setdefault(name, []).append(box)
    return boxes


def candidate_boxes_file(output_dir: PathLike, split: str) -> Path:
    """The candidate boxes file of a split's crops in an `hvpnet-extract-objects` folder, next to its crop map."""
    return Path(output_dir) / f"objects_{split}_boxes.json"


def save_candidate_boxes(boxes: Mapping[str, Sequence[Sequence[float]]], path: PathLike) -> None:
    """Writes `{image file name: [[xmin, ymin, xmax, ymax], ...]}` (one box per crop of the crop map, in its order)
    as JSON, atomically (see `atomic_write`)."""
    with atomic_write(path) as temporary:
        temporary.write_text(json.dumps({name: [list(box) for box in found] for name, found in boxes.items()}))


def _candidate_lists(
    split: str, examples: list[_Example], candidate_boxes: Mapping[str, PathLike | Mapping] | None
) -> list[list[list[float]]]:
    """Per example, the boxes of its image's candidates (empty when none are given for it)."""
    if candidate_boxes is None or split not in candidate_boxes:
        return [[] for _ in examples]
    source = candidate_boxes[split]
    where = f"candidate boxes of split {split!r}" if isinstance(source, Mapping) else str(source)
    if not isinstance(source, Mapping):
        with open(source, encoding="utf-8") as file:
            source = json.load(file)
    lists = []
    for example in examples:
        found = source.get(example.image_file, [])
        for box in found:
            if not (isinstance(box, Sequence) and len(box) == 4 and 0 <= box[0] < box[2] and 0 <= box[1] < box[3]):
                raise ValueError(
                    f"{where}: image {example.image_file} has the box {box!r}; a box is [xmin, ymin, xmax, ymax] "
                    "with xmin < xmax and ymin < ymax, in pixels"
                )
        lists.append([list(map(float, box)) for box in found])
    return lists


def _keep_candidates(data: Dataset, num_candidates: int, with_boxes: bool) -> Dataset:
    """`data` with at most `num_candidates` candidates (boxes and crops) per image; an image with crops needs one box
    per crop."""
    if not with_boxes:
        return data
    for row, (boxes, crops) in enumerate(zip(data["candidate_boxes"], data["objects"], strict=True)):
        if crops and len(boxes) != len(crops):
            raise ValueError(
                f"the {data.split} split's image {data[row]['image_id']} has {len(crops)} crops in its crop map "
                f"but {len(boxes)} candidate boxes; give one box per crop, in the crop map's order"
            )

    def keep(batch: dict[str, list]) -> dict[str, list]:
        return {name: [values[:num_candidates] for values in batch[name]] for name in ("candidate_boxes", "objects")}

    return data.map(keep, batched=True, desc="Candidates kept")


def candidate_matches(
    candidate_boxes: Sequence[Sequence[float]], gold_boxes: Sequence[Sequence[float]]
) -> torch.Tensor:
    """
    `(num_candidates,)` booleans: whether each candidate is the region of an entity with `gold_boxes`, i.e. has an
    IoU above `IOU_THRESHOLD` with one of them (the rule of the `gmner_f1` metric). All false for an ungroundable
    entity.
    """
    if not candidate_boxes or not gold_boxes:
        return torch.zeros(len(candidate_boxes), dtype=torch.bool)
    ious = box_iou(torch.tensor(candidate_boxes, dtype=torch.float64), torch.tensor(gold_boxes, dtype=torch.float64))
    return (ious > IOU_THRESHOLD).any(dim=1)


def grounding_counts(examples: Dataset) -> dict[str, int]:
    """`entities`, `groundable` and `ungroundable` entities, and gold `boxes`, of a split loaded here."""
    counts = {"entities": 0, "groundable": 0, "ungroundable": 0, "boxes": 0}
    for entities in examples["entities"]:
        for entity in entities:
            counts["entities"] += 1
            counts["groundable" if entity["boxes"] else "ungroundable"] += 1
            counts["boxes"] += len(entity["boxes"])
    return counts


def candidate_recall(examples: Dataset) -> dict[str, float]:
    """
    The share of groundable entities with at least one candidate that is their region (`candidate_matches`): no
    model choosing among these candidates can ground more, so it bounds the EEG recall. Returns `recall`,
    `groundable` and `covered`.
    """
    groundable = covered = 0
    for entities, candidates in zip(examples["entities"], examples["candidate_boxes"], strict=True):
        for entity in entities:
            if entity["boxes"]:
                groundable += 1
                covered += bool(candidate_matches(candidates, entity["boxes"]).any())
    return {"recall": covered / groundable if groundable else 0.0, "groundable": groundable, "covered": covered}


__all__ = [
    "DEFAULT_NUM_CANDIDATES",
    "FMNERG_TAG_COLUMNS",
    "FMNERG_TYPES",
    "GMNER_ENTITY_TYPES",
    "bio_labels",
    "candidate_boxes_file",
    "candidate_matches",
    "candidate_recall",
    "grounding_counts",
    "load_fmnerg_dataset",
    "load_gmner_dataset",
    "read_voc_boxes",
    "save_candidate_boxes",
]
