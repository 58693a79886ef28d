"""
Packs a published release (Twitter-2015, Twitter-2017, MNRE or CMNER, laid out as it was published) into one Hugging
Face data set whose images and object crops are embedded in the data, with a dataset card.

    hvpnet-pack-dataset --release twitter2015 --data_dir data/twitter2015 --image_dir data/twitter2015_images \\
        --object_dir data/twitter2015_aux_images --output_dir twitter2015-packed
    hvpnet-pack-dataset --release mnre --data_dir data/txt --rel2id data/ours_rel2id.json --image_dir data/img_org \\
        --object_dir data/img_vg --push_to_hub you/mnre --private
    hvpnet-pack-dataset --release cmner --data_dir CMNER/text --image_dir CMNER/images --output_dir cmner-packed

The release is read by the package's loaders, its folders and crop maps found as the training scripts find them
(`find_release_layout`; the crop maps `*_{train,val,test}_dict.pth` in `--object_map_dir`, by default `--data_dir`).
Each split keeps the loaders' columns (`id`, `tokens`, `ner_tags` or `head` / `tail` / `relation`, `image_id`), with
`image` an `Image()` feature (CMNER: a list of them, the post's pictures) and `objects` a list of them: the bytes of
each file, unchanged, so the result needs no image folder. An image or crop that is missing or unreadable is None
(a CMNER post without pictures has an empty list), and counted in the card.

`--output_dir` writes Parquet files, one per split, as `data/<split>-00000-of-00001.parquet` (`load_dataset(folder)`
reads them), or with `--output_format arrow` the folder of `DatasetDict.save_to_disk` (`load_from_disk` reads it);
both with the card as `README.md`. An existing folder is refused unless `--overwrite` replaces it. `--push_to_hub`
uploads the card and then the data set (`DatasetDict.push_to_hub`) to a data set repository of the Hub, created
private with `--private`. The embedded images are staged in the `datasets` cache folder while the command runs.

The card gives the source, the citation of the release's paper, the examples and the missing images and crops of
each split. Publish the result, even privately, only with the right to share its images.
"""

import argparse
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import datasets
from datasets import DatasetDict, Features, Image, List
from huggingface_hub import DatasetCard, DatasetCardData, HfApi

from .loading import (
    check_images_found_in_splits,
    find_release_layout,
    load_cmner_dataset,
    load_mner_dataset,
    load_mre_dataset,
)
from .output_files import check_output_dir

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike


@dataclass(frozen=True)
class Release:
    """A published data set: its name, task (`"ner"` or `"re"`), where it comes from, the paper to cite, its loader
    (`hvpnet_hf.loading`), its columns as the card describes them and the language of its text."""

    name: str
    task: str
    source: str
    citation: str
    loader: Callable[..., DatasetDict]
    columns: str
    language: str = "en"


NER_COLUMNS = (
    "`id` (example index in its split file), `tokens` (words), `ner_tags` (BIO tags over PER, LOC, ORG, MISC; the "
    "type OTHER is read as MISC), `image_id` (the image's file name), `image`, `objects`."
)


RELEASES = {
    "twitter2015": Release(
        name="Twitter-2015",
        task="ner",
        source="the text of `data/twitter2015` of jefferyYu/UMT, its images, and the object crops and crop maps "
        "of the zjunlp/HVPNeT release",
        citation="""@inproceedings{zhang2018twitter2015,
  title     = {Adaptive Co-Attention Network for Named Entity Recognition in Tweets},
  author    = {Zhang, Qi and Fu, Jinlan and Liu, Xiaoyu and Huang, Xuanjing},
  booktitle = {Proceedings of the Thirty-Second AAAI Conference on Artificial Intelligence},
  pages     = {5674--5681},
  year      = {2018}
}""",
        loader=load_mner_dataset,
        columns=NER_COLUMNS,
    ),
    "twitter2017": Release(
        name="Twitter-2017",
        task="ner",
        source="the text of `data/twitter2017` of jefferyYu/UMT, its images, and the object crops and crop maps "
        "of the zjunlp/HVPNeT release",
        citation="""@inproceedings{lu2018twitter2017,
  title     = {Visual Attention Model for Name Tagging in Multimodal Social Media},
  author    = {Lu, Di and Neves, Leonardo and Carvalho, Vitor and Zhang, Ning and Ji, Heng},
  booktitle = {Proceedings of the 56th Annual Meeting of the Association for Computational Linguistics
               (Volume 1: Long Papers)},
  pages     = {1990--1999},
  year      = {2018}
}""",
        loader=load_mner_dataset,
        columns=NER_COLUMNS,
    ),
    "mnre": Release(
        name="MNRE",
        task="re",
        source="the relations of thecharm/MNRE with the images, object crops and crop maps of the zjunlp/HVPNeT "
        "release",
        citation="""@inproceedings{zheng2021mnre,
  title     = {{MNRE}: A Challenge Multimodal Dataset for Neural Relation Extraction with Visual Evidence in
               Social Media Posts},
  author    = {Zheng, Changmeng and Wu, Zhiwei and Feng, Junhao and Fu, Ze and Cai, Yi},
  booktitle = {2021 IEEE International Conference on Multimedia and Expo (ICME)},
  pages     = {1--6},
  year      = {2021}
}""",
        loader=load_mre_dataset,
        columns="`id` (record index in its split file), `tokens` (words), `head` and `tail` (`name`, `start`, `end`: "
        "word offsets, end exclusive), `relation`, `image_id` (the image's file name), `image`, `objects`.",
    ),
    "cmner": Release(
        name="CMNER",
        task="ner",
        source="the Weibo posts of `text/{train,dev,test}.txt` of Jyz99/CMNER and their images, several per post",
        citation="""@article{ji2024cmner,
  title   = {{CMNER}: A {C}hinese Multimodal {NER} Dataset based on Social Media},
  author  = {Ji, Yuanze and Li, Bobo and Zhou, Jun and Li, Fei and Teng, Chong and Ji, Donghong},
  journal = {arXiv preprint arXiv:2402.13693},
  year    = {2024}
}""",
        loader=load_cmner_dataset,
        columns="`id` (post index in its split file), `tokens` (the characters), `ner_tags` (BIO tags over PER, LOC, "
        "ORG, MISC), `image_id` (the post's WID), `image` (the post's pictures, sorted by file name; empty for a "
        "post without any), `objects`.",
        language="zh",
    ),
}
OUTPUT_FORMATS = ("parquet", "arrow")

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ release.name }}

{{ release.name }} ({{ task_name }}) as published: {{ release.source }}. It was packed with `hvpnet-pack-dataset`
of `hvpnet_hf`, which reads the release with the package's loaders: each example keeps the loaders' columns, with
`image` an `Image()` feature (for a post with several pictures, a list of them) and `objects` a list of them (its
object crops), holding the bytes of the published files. An image or crop that was missing or unreadable in the
release is None, or left out of a post's list of pictures; "missing images" counts the examples without any.

| split | examples | missing images | missing object crops |
| --- | --- | --- | --- |
{% for row in splits -%}
| {{ row | join(" | ") }} |
{% endfor %}
## Columns

{{ release.columns }}

## Use

```python
from datasets import load_dataset

data = load_dataset("<this repository or folder>")  # load_from_disk for a folder of save_to_disk
```

In `hvpnet_hf`, `with_undecoded_images` (`hvpnet_hf.collating`) leaves the images undecoded, so that the data
collator decodes them as it decodes the published files.

## The images

The images are those of the original social media posts. Share this data set, even in a private repository, only if
you have the right to share its images.

## Citation

```bibtex
{{ release.citation }}
```
"""
TASK_NAMES = {"ner": "multimodal named entity recognition", "re": "multimodal relation extraction"}


def read_release(
    release: str,
    data_dir: PathLike,
    image_dir: PathLike,
    object_dir: PathLike | None = None,
    object_map_dir: PathLike | None = None,
    rel2id: PathLike | None = None,
) -> DatasetDict:
    """
    The splits of `release` (a key of `RELEASES`) as the loaders read them, images and crops as paths (None where
    missing or unreadable), with the folders and crop maps of the published layout (see `find_release_layout`). An
    image folder that holds none of a split's images is an error.
    """
    layout = find_release_layout(image_dir, object_dir, object_map_dir or data_dir)
    if RELEASES[release].task == "re":
        layout["rel2id"] = rel2id
    splits = RELEASES[release].loader(data_dir, **layout)
    check_images_found_in_splits(
        splits, layout["image_dir"], "image_dir", "give the folder of the images the split files name"
    )
    return splits


def embed_images(splits: DatasetDict, cache_dir: PathLike) -> DatasetDict:
    """
    `splits` with the `image` path column as an `Image()` feature (a list of them where it holds lists of paths) and
    `objects` as a list of them, each value the bytes of its file (`{"bytes", "path"}`, the path being the file name)
    or None. The splits are written to Arrow
    files in `cache_dir`, 100 examples at a time, rather than held in memory.
    """
    packed = {}
    for split, examples in splits.items():
        image = List(Image()) if isinstance(examples.features["image"], List) else Image()
        features = Features({**examples.features, "image": image, "objects": List(Image())})
        packed[split] = examples.map(
            _embedded_batch,
            batched=True,
            batch_size=100,
            writer_batch_size=100,
            features=features,
            cache_file_name=str(Path(cache_dir) / f"{split}.arrow"),
            load_from_cache_file=False,
            desc=f"Embedding the {split} images",
        )
    return DatasetDict(packed)


def _embedded_batch(batch: Mapping[str, list]) -> dict[str, list]:
    return {
        "image": [
            [_embedded(path) for path in images] if isinstance(images, list) else _embedded(images)
            for images in batch["image"]
        ],
        "objects": [[_embedded(path) for path in crops] for crops in batch["objects"]],
    }


def _embedded(path: str | None) -> dict[str, bytes | str] | None:
    return None if path is None else {"bytes": Path(path).read_bytes(), "path": Path(path).name}


def dataset_card(release: str, splits: DatasetDict) -> DatasetCard:
    """The card of `release` packed from `splits` (as `read_release` gives them): source, counts, rights, citation."""
    info = RELEASES[release]
    card_data = DatasetCardData(
        pretty_name=info.name,
        language=info.language,
        task_categories="token-classification" if info.task == "ner" else "text-classification",
        tags=["multimodal", "named-entity-recognition" if info.task == "ner" else "relation-extraction"],
    )
    rows = []
    for split, examples in splits.items():
        crops = [crop for objects in examples["objects"] for crop in objects]
        missing_images = sum(not images for images in examples["image"])  # None, or a post's empty list
        rows.append(
            [split, len(examples), f"{missing_images} of {len(examples)}", f"{crops.count(None)} of {len(crops)}"]
        )
    return DatasetCard.from_template(
        card_data,
        template_str=CARD_TEMPLATE,
        release=info,
        task_name=TASK_NAMES[info.task],
        splits=rows,
    )


def save_packed(packed: DatasetDict, card: DatasetCard, output_dir: PathLike, output_format: str) -> None:
    """
    Writes `packed` and its card (`README.md`) to `output_dir`: Parquet files `data/<split>-00000-of-00001.parquet`,
    or the folder of `save_to_disk` (`output_format="arrow"`). The folder is written next to `output_dir` and then
    put in its place, so a failed run leaves no half-written data set; an existing `output_dir` is replaced.
    """
    output_dir = Path(output_dir)
    partial = output_dir.with_name(f"{output_dir.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        if output_format == "arrow":
            packed.save_to_disk(partial)
        else:
            for split, examples in packed.items():
                (partial / "data").mkdir(parents=True, exist_ok=True)
                examples.to_parquet(partial / "data" / f"{split}-00000-of-00001.parquet")
        card.save(partial / "README.md")
        shutil.rmtree(output_dir, ignore_errors=True)
        partial.rename(output_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def push_packed(
    packed: DatasetDict, card: DatasetCard, repo_id: str, private: bool = False, api: HfApi | None = None
) -> None:
    """
    Uploads the card and then `packed` (`DatasetDict.push_to_hub`, which adds the splits' metadata to the card) to
    the data set repository `repo_id`, created private when `private` (an existing repository keeps its visibility).
    """
    api = api or HfApi()
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    api.upload_file(
        path_or_fileobj=str(card).encode(),
        path_in_repo="README.md",
        repo_id=repo_id,
        repo_type="dataset",
        commit_message="Add the dataset card",
    )
    packed.push_to_hub(repo_id, private=private)


def pack_release(
    release: str,
    data_dir: PathLike,
    image_dir: PathLike,
    object_dir: PathLike | None = None,
    object_map_dir: PathLike | None = None,
    rel2id: PathLike | None = None,
    *,
    output_dir: PathLike | None = None,
    output_format: str = "parquet",
    overwrite: bool = False,
    push_to_hub: str | None = None,
    private: bool = False,
) -> DatasetDict:
    """
    Packs `release` (a key of `RELEASES`) with its card into `output_dir`, or uploads it to the Hub data set
    repository `push_to_hub` (see the module docstring; the arguments are the command's). Inputs and outputs are
    checked before anything is read. Returns the splits as the loaders read them, images and crops as paths.
    """
    folders = {
        "data_dir": data_dir,
        "image_dir": image_dir,
        "object_dir": object_dir,
        "object_map_dir": object_map_dir,
    }
    check_sources(release, folders, rel2id)
    check_destination(output_dir, output_format, overwrite, push_to_hub, private, folders.values())
    splits = read_release(release, data_dir, image_dir, object_dir, object_map_dir, rel2id)
    card = dataset_card(release, splits)
    Path(datasets.config.HF_DATASETS_CACHE).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hvpnet-pack-", dir=datasets.config.HF_DATASETS_CACHE) as cache_dir:
        packed = embed_images(splits, cache_dir)
        if output_dir is not None:
            save_packed(packed, card, output_dir, output_format)
        else:
            push_packed(packed, card, push_to_hub, private)
    logger.info("Packed %s: %s", RELEASES[release].name, {split: len(rows) for split, rows in splits.items()})
    return splits


def check_sources(release: str, folders: Mapping[str, PathLike | None], rel2id: PathLike | None) -> None:
    """Refuses an unknown release, input folders (`{setting: folder or None}`) that are not there, crop maps without
    their crops, and relation ids that are not a file or given for NER."""
    if release not in RELEASES:
        raise ValueError(f"release must be one of {sorted(RELEASES)}, got {release!r}")
    for name, folder in folders.items():
        if folder is not None and not Path(folder).is_dir():
            raise NotADirectoryError(f"{name} {folder} is not a folder")
    if folders["object_map_dir"] is not None and folders["object_dir"] is None:
        raise ValueError(f"object_map_dir {folders['object_map_dir']} names crop maps; give their object_dir too")
    if rel2id is not None and RELEASES[release].task != "re":
        raise ValueError(f"rel2id names relation ids, which {release} has not")
    if rel2id is not None and not Path(rel2id).is_file():
        raise FileNotFoundError(f"rel2id {rel2id} is not a file")


def check_destination(
    output_dir: PathLike | None,
    output_format: str,
    overwrite: bool,
    push_to_hub: str | None,
    private: bool,
    inputs: Iterable[PathLike | None],
) -> None:
    """
    Refuses a destination that is not exactly one of `output_dir` and `push_to_hub`, settings of the other one, and
    an `output_dir` that exists (unless `overwrite`) or holds one of the input folders, which replacing it would
    delete.
    """
    if (output_dir is None) == (push_to_hub is None):
        raise ValueError("give one destination: output_dir or push_to_hub")
    if push_to_hub is not None:
        if overwrite or output_format != "parquet":
            raise ValueError("overwrite and output_format go with output_dir; the Hub holds Parquet files")
        return
    if private:
        raise ValueError("private goes with push_to_hub")
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output_format must be one of {list(OUTPUT_FORMATS)}, got {output_format!r}")
    check_output_dir(output_dir, "output_dir")
    for folder in inputs:
        if folder is not None and Path(folder).resolve().is_relative_to(Path(output_dir).resolve()):
            raise ValueError(f"output_dir {output_dir} holds the input folder {folder}; write elsewhere")
    if Path(output_dir).exists() and not overwrite:
        raise FileExistsError(f"output_dir {output_dir} exists; pass overwrite (--overwrite) to replace it")


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="hvpnet-pack-dataset", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--release", required=True, choices=sorted(RELEASES), help="which published data set")
    parser.add_argument("--data_dir", required=True, help="folder of the split files")
    parser.add_argument(
        "--image_dir", required=True, help="folder of the images, flat or as {train,val,test}/ (CMNER: flat)"
    )
    parser.add_argument("--object_dir", help="folder of the object crops, flat or as {train,val,test}/crops/")
    parser.add_argument(
        "--object_map_dir", help="folder of the crop maps *_{train,val,test}_dict.pth (default: data_dir)"
    )
    parser.add_argument("--rel2id", help="MNRE: JSON file of the relation ids (default: names from the files)")
    destination = parser.add_mutually_exclusive_group(required=True)
    destination.add_argument("--output_dir", help="folder to write the data set and its card to")
    destination.add_argument("--push_to_hub", metavar="REPO_ID", help="data set repository of the Hub to upload to")
    parser.add_argument("--output_format", choices=OUTPUT_FORMATS, default="parquet", help="with --output_dir")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output_dir")
    parser.add_argument("--private", action="store_true", help="with --push_to_hub: create the repository private")
    return parser.parse_args(argv)


def run(argv: list[str] | None = None) -> DatasetDict:
    """Runs the command with `argv`; returns what `pack_release` returns."""
    args = vars(parse_arguments(argv))
    return pack_release(args.pop("release"), args.pop("data_dir"), args.pop("image_dir"), **args)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(format="%(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    run(argv)


if __name__ == "__main__":
    main()
