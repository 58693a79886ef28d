"""
Finds object crops for the images of a data file and writes them in the layout of the published releases.

    python -m hvpnet_hf.extract_objects --input data/twitter2015/train.txt --image_dir data/twitter2015_images \\
        --output_dir data/twitter2015_objects
    python -m hvpnet_hf.extract_objects --input data/mnre/txt/ours_val.txt --image_dir data/mnre/img_org/val \\
        --output_dir data/mnre_objects --detector facebook/detr-resnet-50

The input is a Twitter-2015/2017 file (`IMGID:` blocks), a CMNER file (`WID:` headers) or an MNRE file (one literal
per line), told apart by its first line. For each image the detector's best `--num_objects` boxes are cut out (see
`object_detection`) and written to `<output_dir>/<split>/crops/<image stem>_crop_<n>.jpg`; the crop map
`<output_dir>/objects_<split>_dict.pth` (`torch.save`d `{image file name: [crop file names]}`) lists them, an empty
list for an image where nothing was found, and `<output_dir>/objects_<split>_boxes.json` the box of each crop, in
the map's order (`{key: [[xmin, ymin, xmax, ymax], ...]}` in the image's pixels, the candidate regions of grounded
NER: `grounding_data.candidate_boxes_file`). A CMNER post's crops are cut from its first picture, the global image
(its other pictures take the next image slots, ahead of the crops), and its map key is its WID. This is the layout `run_mner.py` / `run_mre.py` read with `--object_dir <output_dir> --object_map_dir
<output_dir>`. A zero-shot detector is queried per image with `text_queries` of the texts that use it (for MNRE the
head and tail mentions first).

The command can be stopped and run again: the map and the boxes are rewritten atomically every `--save_every` images
and when the command stops, and images already in both are skipped. `<output_dir>/objects_<split>_settings.json` records the
detector and settings; running again with other settings is an error. Images are read as the image processor reads
them (`load_image`: RGB, upright by their EXIF orientation). Missing or unreadable images, and images over PIL's
decompression-bomb limit, are counted, logged and left out of the map (a later run tries them again).
"""

import argparse
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from .grounding_data import candidate_boxes_file, save_candidate_boxes
from .image_processing_hvpnet import load_image
from .loading import LOADER_OF_FORMAT, SPLIT_ALIASES, data_file_format, load_cmner_dataset, split_of_file
from .object_detection import DEFAULT_DETECTOR, ObjectCropper, text_queries
from .output_files import atomic_write, check_output_dir

logger = logging.getLogger(__name__)
# The folder and crop-map name of each split, as in the releases (`train/`, `val/`, `test/`, `*_val_dict.pth`).
_SPLIT_FOLDER = {split: aliases[0] for split, aliases in SPLIT_ALIASES.items()}
SPLITS = tuple(_SPLIT_FOLDER.values())


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m hvpnet_hf.extract_objects",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--input", required=True, help="data file (Twitter IMGID: blocks, CMNER, MNRE lines)")
    parser.add_argument("--image_dir", required=True, help="folder of the images the data file names")
    parser.add_argument("--output_dir", required=True, help="folder for <split>/crops/ and the crop map")
    parser.add_argument("--split", choices=SPLITS, help="split folder and map name (default: from the input's name)")
    parser.add_argument("--detector", default=DEFAULT_DETECTOR, help="Hub id or folder of a detection model")
    parser.add_argument("--num_objects", type=int, default=3, help="crops per image at most")
    parser.add_argument("--threshold", type=float, default=0.1, help="lowest detector score kept")
    parser.add_argument("--min_size", type=int, default=16, help="smallest box side kept, in pixels")
    parser.add_argument("--max_overlap", type=float, default=0.5, help="IoU above which a box is a duplicate")
    parser.add_argument("--save_every", type=int, default=50, help="images between two writes of the crop map")
    parser.add_argument("--device", default=None, help="device of the detector, e.g. cuda:0 (default: CPU)")
    args = parser.parse_args(argv)
    for name in ("num_objects", "save_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    return args


def check_paths(args: argparse.Namespace) -> None:
    """Refuses, before the detector is loaded, an input file, image folder or output folder the command cannot use,
    and an input whose split is neither given nor in its name."""
    if not Path(args.input).is_file():
        raise FileNotFoundError(f"--input {args.input} is not a file")
    if not Path(args.image_dir).is_dir():
        raise NotADirectoryError(f"--image_dir {args.image_dir} is not a folder")
    check_output_dir(args.output_dir, "--output_dir")
    if args.split is None:
        split_of(Path(args.input))


def split_of(path: Path) -> str:
    """`train`, `val` or `test`, from a data file name such as `valid.txt` or `mnre_dev.txt`."""
    split = split_of_file(path)
    if split is None:
        raise ValueError(f"cannot tell the split from the file name {path.name}; pass --split")
    return _SPLIT_FOLDER[split]


@dataclass
class CropSource:
    """What the crops of one key of the crop map are cut from: a file name in the image folder (None for a CMNER
    post without pictures) and the detector queries of the examples that use it."""

    image_file: str | None
    queries: list[str]


def crop_sources(data_file: Path, image_dir: Path | None = None) -> dict[str, CropSource]:
    """
    Per key of the crop map (in order of first use), what its crops are cut from. The key is the image file name of
    a Twitter or MNRE example, and the WID of a CMNER post, whose crops are cut from its first picture in `image_dir`.
    """
    file_format = data_file_format(data_file)
    if file_format == "cmner":
        examples = load_cmner_dataset(data_files={"test": data_file}, image_dir=image_dir)["test"]
        image_files = [Path(images[0]).name if images else None for images in examples["image"]]
    else:
        examples = LOADER_OF_FORMAT[file_format](data_files={"test": data_file})["test"]
        image_files = examples["image_id"]
    if file_format == "mnre":
        example_queries = [text_queries(row["tokens"], [row["head"]["name"], row["tail"]["name"]]) for row in examples]
    else:
        example_queries = [text_queries(tokens) for tokens in examples["tokens"]]
    sources: dict[str, CropSource] = {}
    for key, image_file, example_query in zip(examples["image_id"], image_files, example_queries, strict=True):
        merged = sources.setdefault(key, CropSource(image_file, [])).queries
        merged += [query for query in example_query if query not in merged]
    stems: dict[str, str] = {}
    for image_file in (source.image_file for source in sources.values() if source.image_file is not None):
        other = stems.setdefault(Path(image_file).stem, image_file)
        if other != image_file:
            raise ValueError(f"{data_file}: images {other} and {image_file} would share crop file names")
    return sources


def save_crop_map(crop_map: dict[str, list[str]], path: Path) -> None:
    """`torch.save`s `crop_map` to `path` atomically (see `atomic_write`): a reader never sees half a map."""
    with atomic_write(path) as temporary:
        torch.save(crop_map, temporary)


def extract_objects(
    data_file: str | os.PathLike,
    image_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    cropper: ObjectCropper,
    split: str | None = None,
    save_every: int = 50,
) -> dict[str, int]:
    """
    Writes the crops and crop map of `data_file`'s images (see the module docstring) and returns counts: `images`
    in the file (CMNER: posts), `skipped` (already in the map), `extracted`, `missing` (CMNER: posts without a
    readable picture included), `without_objects` and `crops` (written now).
    """
    if save_every < 1:
        raise ValueError(f"save_every must be at least 1, got {save_every}")
    data_file, image_dir, output_dir = Path(data_file), Path(image_dir), Path(output_dir)
    split = split or split_of(data_file)
    sources = crop_sources(data_file, image_dir)
    crop_dir = output_dir / split / "crops"
    crop_dir.mkdir(parents=True, exist_ok=True)
    map_path = output_dir / f"objects_{split}_dict.pth"
    _check_settings(output_dir / f"objects_{split}_settings.json", cropper.settings)
    boxes_path = candidate_boxes_file(output_dir, split)
    crop_map: dict[str, list[str]] = torch.load(map_path, weights_only=True) if map_path.exists() else {}
    boxes = json.loads(boxes_path.read_text(encoding="utf-8")) if boxes_path.exists() else {}
    pending = {key: source for key, source in sources.items() if key not in crop_map or key not in boxes}
    counts = {"images": len(sources), "skipped": len(sources) - len(pending), "extracted": 0, "missing": 0}
    counts.update(without_objects=0, crops=0)
    try:
        for done, (key, image) in enumerate(_read_images(image_dir, pending, counts), start=1):
            names = []
            found = cropper.detect(image, sources[key].queries)
            for index, detected in enumerate(found):
                names.append(f"{Path(sources[key].image_file).stem}_crop_{index}.jpg")
                image.crop(detected.box).save(crop_dir / names[-1], quality=95)
            crop_map[key], boxes[key] = names, [list(detected.box) for detected in found]
            counts["extracted"] += 1
            counts["crops"] += len(names)
            counts["without_objects"] += not names
            if done % save_every == 0:
                save_crop_map(crop_map, map_path)
                save_candidate_boxes(boxes, boxes_path)
    finally:
        save_crop_map(crop_map, map_path)
        save_candidate_boxes(boxes, boxes_path)
    if counts["missing"]:
        logger.warning(
            "%d of %d images missing or unreadable in %s; not in the map", counts["missing"], len(sources), image_dir
        )
    return counts


def _read_images(
    image_dir: Path, sources: dict[str, CropSource], counts: dict[str, int]
) -> Iterator[tuple[str, Image.Image]]:
    """`(key, image)` of the `sources` whose image `load_image` reads, with a progress bar; the others are counted and
    logged."""
    for key, source in tqdm(sources.items(), desc="images", unit="image"):
        if source.image_file is None:
            logger.warning("post %s has no picture in %s; no crops for it", key, image_dir)
            counts["missing"] += 1
            continue
        try:
            image = load_image(image_dir / source.image_file)
        except OSError as error:
            logger.warning("%s; no crops for it", error)
            counts["missing"] += 1
            continue
        yield key, image


def _check_settings(path: Path, settings: dict) -> None:
    if path.exists():
        recorded = json.loads(path.read_text(encoding="utf-8"))
        if recorded != settings:
            raise ValueError(f"{path} records crops made with {recorded}, not {settings}; use another --output_dir")
    else:
        path.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")


def run(argv: list[str] | None = None) -> dict[str, int]:
    """Runs the command with `argv`; returns the counts of `extract_objects`."""
    args = parse_arguments(argv)
    check_paths(args)
    cropper = ObjectCropper(
        args.detector,
        num_objects=args.num_objects,
        threshold=args.threshold,
        min_size=args.min_size,
        max_overlap=args.max_overlap,
        device=args.device,
    )
    counts = extract_objects(args.input, args.image_dir, args.output_dir, cropper, args.split, args.save_every)
    print(json.dumps(counts))
    return counts


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(format="%(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    run(argv)


if __name__ == "__main__":
    main()
