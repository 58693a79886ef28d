"""
What the analyses of a trained model share: its command-line data arguments, one split of the bundled sample set or
of a data file in a published format (Twitter-2015/2017 or CMNER for NER, MNRE for RE), and batches of model inputs that keep their rows' gold labels.
"""

import argparse
from collections.abc import Iterator
from pathlib import Path

import torch
from datasets import Dataset
from torch.utils.data import DataLoader
from transformers import PreTrainedModel

from ..collating import HVPNetDataCollator, tokenize_and_align
from ..loading import (
    LOADER_OF_FORMAT,
    SPLIT_ALIASES,
    check_images_found,
    data_file_format,
    find_file_layout,
    load_mner_dataset,
    load_mre_dataset,
)
from ..output_files import check_output_dir
from ..pipelines import PIPELINE_FOR_TASK, task_of
from ..processing_hvpnet import HVPNetProcessor
from ..sample_data import sample_sources


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """`--model` and the data: a split of the bundled sample set (default) or one file with its image folders."""
    parser.add_argument("--model", required=True, help="folder of a trained HVPNeT model (with its processor)")
    parser.add_argument("--split", choices=list(SPLIT_ALIASES), default="test", help="split of the sample set")
    parser.add_argument(
        "--data_file", help="instead of the sample set: a data file in a published format (Twitter, CMNER, MNRE)"
    )
    parser.add_argument("--image_dir", help="with --data_file: folder of its images, flat or per split")
    parser.add_argument("--object_dir", help="with --data_file: folder of its object crops, flat or per split")
    parser.add_argument(
        "--object_map", help="with --data_file: its torch.save'd crop map (default: *_<split>_dict.pth next to it)"
    )
    parser.add_argument("--rel2id", help="with --data_file (RE): JSON {relation: id} of the data set")
    parser.add_argument("--max_samples", type=int, help="only the first N examples (a quick look at a large split)")
    parser.add_argument("--batch_size", type=int, default=16)


def check_arguments(args: argparse.Namespace) -> None:
    """Refuses, before the model is loaded, sizes out of range, a `--data_file` that is not a file and an
    `--output_dir` that is a file."""
    for name in ("batch_size", "max_samples"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be at least 1, got {value}")
    if args.data_file is not None and not Path(args.data_file).is_file():
        raise FileNotFoundError(f"--data_file {args.data_file} is not a file")
    check_output_dir(args.output_dir, "--output_dir")


def load_examples(task: str, args: argparse.Namespace) -> Dataset:
    """
    The examples the arguments name (the first `--max_samples`): a split of the sample set, or `--data_file` (read by
    the loader of its format, `data_file_format`) with the images and crops of its split, found as `hvpnet-predict`
    finds them (see `find_file_layout`). A file of the other task, and an `--image_dir` that holds none of their
    images (see `check_images_found`), are errors.
    """
    if args.data_file is None:
        sources, split = sample_sources(task), args.split
        loader = load_mner_dataset if task == "ner" else load_mre_dataset
    else:
        file_format = data_file_format(args.data_file)
        if (file_format == "mnre") != (task == "re"):
            raise ValueError(f"--data_file {args.data_file} is a {file_format} file, not data of the {task} model")
        sources = find_file_layout(args.data_file, args.image_dir, args.object_dir, args.object_map)
        split = "test"  # the split `find_file_layout` reads the file as
        if task == "re":
            sources["rel2id"] = args.rel2id
        loader = LOADER_OF_FORMAT[file_format]
    examples = loader(**sources)[split]
    if args.max_samples is not None:
        examples = examples.select(range(min(args.max_samples, len(examples))))
    if args.data_file is not None and args.image_dir is not None:
        text_only = "leave --image_dir out to analyze the text only"
        check_images_found(examples, f"--data_file {args.data_file}", sources["image_dir"], "--image_dir", text_only)
    return examples


def load_model(path: str, **kwargs) -> tuple[str, HVPNetProcessor, PreTrainedModel]:
    """`(task, processor, model)` of a trained folder; the model in evaluation mode."""
    task = task_of(path)
    model = PIPELINE_FOR_TASK[task].auto_model_class.from_pretrained(path, **kwargs).eval()
    return task, HVPNetProcessor.from_pretrained(path), model


def batches(
    examples: Dataset, processor: HVPNetProcessor, batch_size: int
) -> Iterator[tuple[dict[str, torch.Tensor], list[int]]]:
    """Model inputs of `examples` in order, batch by batch, with the indices of the batch's rows."""
    encoded = examples.map(tokenize_and_align, batched=True, fn_kwargs={"processor": processor})
    encoded = encoded.add_column("row", list(range(len(encoded))))
    collator = HVPNetDataCollator(processor)

    def collate(features: list[dict]) -> tuple[dict[str, torch.Tensor], list[int]]:
        return collator(features), [feature["row"] for feature in features]

    yield from DataLoader(encoded, batch_size=batch_size, collate_fn=collate)
