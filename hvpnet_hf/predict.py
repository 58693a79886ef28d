"""
`hvpnet-predict`: runs a trained HVPNeT model over a file of examples, in its published format or as a data set of
your own (JSON lines, CSV or Parquet), and writes the predictions.

    hvpnet-predict --model outputs/t15 --input data/twitter2015/test.txt --image_dir data/twitter2015_images \\
        --output t15_test_predictions.txt
    hvpnet-predict --model outputs/mnre --input data/txt/ours_test.txt --image_dir data/img_org \\
        --object_dir data/img_vg --output mnre_test.jsonl

Image and crop folders are found as the example scripts find them, for the input's split
(`hvpnet_hf.loading.find_file_layout`): a folder laid out per split (`img_org/{train,val,test}/`,
`img_vg/{train,val,test}/crops/`) gives the folder of the input's split, read from the input's name (`ours_test.txt`,
`valid.txt`); the crop map `*_<split>_dict.pth` is found next to the input file, or named with `--object_map`.

An input ending in .json, .jsonl, .csv or .parquet is read as a data set of your own, as the example scripts read
one (`hvpnet_hf.data_sources`): its columns are named by `--text_column_name`, `--label_column_name`,
`--image_column_name`, `--objects_column_name` and, for RE, `--head_column_name` and `--tail_column_name`; its images
are paths (relative ones to the input's folder) or `Image()` values, and its labels are the model's.

    hvpnet-predict --model outputs/t15 --input posts.jsonl --text_column_name words --output posts_predictions.txt

The task follows from the model. NER input: `IMGID:` blocks of `token<TAB>label` lines (Twitter-2015/2017); output:
CoNLL columns `word gold predicted`, a blank line after each sentence (whitespace inside a word is written as `_`,
an empty word as `_`, so that every line has three columns). RE input: one MNRE record per line; output:
one JSON object per example with the entity pair, the gold and the predicted relation and its probability (with
`--top_k`, the k best relations). Every input example gets exactly one output entry, in input order. The file's own
labels are only copied to the output; when they are present the entity or relation scores are printed too.

`--dtype bfloat16` loads the model in bfloat16; `--num_workers N` reads, decodes and tokenizes the examples in N
worker processes while the model runs.

Before the model runs, the command refuses an `--output` it could not write (a folder, or a file in a folder that
does not exist), a `--top_k` above the model's number of relations (and `--top_k` or `--rel2id` for an NER
model), and an `--image_dir` that holds none of the input's images (leave it out to predict from the text only;
some missing images are masked and counted).
"""

import argparse
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import evaluate
import torch
from datasets import Dataset, DatasetDict
from transformers import AutoConfig, pipeline

from .data_sources import COLUMN_FLAGS, TASK_COLUMNS, is_table_file, load_table_dataset
from .loading import NO_RELATION, check_images_found, find_file_layout, load_mner_dataset, load_mre_dataset
from .metrics import metric_path
from .output_files import check_output_file
from .pipelines import task_of  # importing it registers "multimodal-ner" and "multimodal-re"
from .prediction_files import write_ner_predictions, write_re_predictions

logger = logging.getLogger(__name__)

# Workers hide at most the time spent reading the inputs, and each is a process of its own (see docs/inference.md).
DEFAULT_NUM_WORKERS = 0
# The pipeline input keys of each task and the columns of the loaded examples they are read from.
NER_INPUT_COLUMNS = {"words": "tokens", "image": "image", "objects": "objects"}
RE_INPUT_COLUMNS = {**NER_INPUT_COLUMNS, "head": "head", "tail": "tail"}


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="hvpnet-predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="folder (or Hub id) of a trained HVPNeT model")
    parser.add_argument(
        "--input",
        required=True,
        help="data file: JSON lines, CSV or Parquet (.json, .jsonl, .csv, .parquet) read as a data set of your own, "
        "any other in the published format",
    )
    parser.add_argument("--output", required=True, help="file to write the predictions to")
    parser.add_argument(
        "--image_dir", help="folder of the images named in the input file, flat or per split (none: text only)"
    )
    parser.add_argument("--object_dir", help="folder of the object crops, flat or per split")
    parser.add_argument(
        "--object_map", help="torch.save'd crop map of this file (default: *_<split>_dict.pth next to --input)"
    )
    parser.add_argument("--rel2id", help="RE: JSON {relation: id} of the data set (to read its gold labels)")
    parser.add_argument("--missing_images", choices=["mask", "error"], default="mask")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "auto"],
        default="float32",
        help="the dtype the model runs in (auto: the one it was saved in)",
    )
    parser.add_argument(
        "--num_workers",
        type=int,
        default=DEFAULT_NUM_WORKERS,
        help="processes that decode the images and tokenize while the model runs (0: all in this process)",
    )
    parser.add_argument("--top_k", type=int, default=None, help="RE: write the k most probable relations")
    columns = parser.add_argument_group(
        "columns of a data set of your own (default: the loaders' names: tokens, ner_tags or relation, image, "
        "objects, head, tail)"
    )
    for flag in dict.fromkeys(COLUMN_FLAGS.values()):
        columns.add_argument(f"--{flag}")
    args = parser.parse_args(argv)
    for name, minimum in (("batch_size", 1), ("num_workers", 0), ("top_k", 1)):
        value = getattr(args, name)
        if value is not None and value < minimum:
            parser.error(f"--{name} must be at least {minimum}, got {value}")
    return args


def bio_tags(entities: list[dict], num_words: int) -> list[str]:
    """BIO tags of one sentence from the pipeline's entities."""
    tags = ["O"] * num_words
    for entity in entities:
        tags[entity["word_start"]] = f"B-{entity['entity_group']}"
        for index in range(entity["word_start"] + 1, entity["word_end"]):
            tags[index] = f"I-{entity['entity_group']}"
    return tags


def load_input(args: argparse.Namespace, loader: Callable[..., DatasetDict], **task_arguments: Any) -> Dataset:
    """
    The input file's examples, read with `loader` (`load_mner_dataset` or `load_mre_dataset`) with the images and
    crops of its split (see `find_file_layout`); an `--image_dir` that holds none of their images is an error (see
    `check_images_found`).
    """
    if is_table_file(args.input):
        return load_own_input(args, "ner" if loader is load_mner_dataset else "re")
    sources = find_file_layout(args.input, args.image_dir, args.object_dir, args.object_map)
    examples = loader(**sources, missing_images=args.missing_images, **task_arguments)["test"]
    if sources["image_dir"] is not None:
        text_only = "leave --image_dir out to predict from the text only"
        check_images_found(examples, f"--input {args.input}", sources["image_dir"], "--image_dir", text_only)
    return examples


def load_own_input(args: argparse.Namespace, task: str) -> Dataset:
    """The examples of a JSON lines, CSV or Parquet input, in the loaders' columns, with the model's labels."""
    release_flags = [
        f"--{name}" for name in ("image_dir", "object_dir", "object_map", "rel2id") if getattr(args, name)
    ]
    if release_flags:
        raise ValueError(
            f"{', '.join(release_flags)}: settings of the published formats; --input {args.input} names its images "
            "in its columns (--image_column_name, --objects_column_name)"
        )
    columns = {column: getattr(args, COLUMN_FLAGS[column]) or column for column in TASK_COLUMNS[task]}
    return load_table_dataset(
        task,
        columns,
        data_files={"test": args.input},
        label_names=list(AutoConfig.from_pretrained(args.model).id2label.values()),
        missing_images=args.missing_images,
        text_only="leave the image column out to predict from the text only",
    )["test"]


class PipelineInputs(torch.utils.data.Dataset):
    """
    The pipeline input of each example, by index: `columns` maps an input key to the column it is read from. An
    indexable input lets the pipeline's DataLoader workers read the examples (a generator is read in one process).
    """

    def __init__(self, examples: Dataset, columns: Mapping[str, str]):
        self.examples = examples
        self.columns = columns

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.examples[index]
        return {key: row[column] for key, column in self.columns.items()}


def call_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """What both tasks pass to the pipeline call."""
    return {"batch_size": args.batch_size, "num_workers": args.num_workers, "missing_images": args.missing_images}


def predict_ner(args: argparse.Namespace) -> dict[str, float]:
    examples = load_input(args, load_mner_dataset)
    tagger = pipeline("multimodal-ner", model=args.model, dtype=args.dtype)
    outputs: Iterator = tagger(PipelineInputs(examples, NER_INPUT_COLUMNS), **call_arguments(args))
    names = examples.features["ner_tags"].feature.names
    predictions = [bio_tags(entities, len(row["tokens"])) for row, entities in zip(examples, outputs, strict=True)]
    references = [[names[tag] for tag in tags] for tags in examples["ner_tags"]]
    write_ner_predictions(args.output, zip(examples["tokens"], references, predictions, strict=True))
    return evaluate.load(metric_path("ner_seqeval")).compute(predictions=predictions, references=references)


def predict_re(args: argparse.Namespace) -> dict[str, float]:
    examples = load_input(args, load_mre_dataset, rel2id=args.rel2id)
    classifier = pipeline("multimodal-re", model=args.model, dtype=args.dtype)
    label2id = classifier.model.config.label2id
    inputs = PipelineInputs(examples, RE_INPUT_COLUMNS)
    ranked = list(classifier(inputs, top_k=args.top_k or 1, **call_arguments(args)))
    names = examples.features["relation"].names
    gold = [names[relation] for relation in examples["relation"]]
    write_re_predictions(args.output, examples, gold, ranked, top_k=bool(args.top_k))
    predictions = [label2id[relations[0]["relation"]] for relations in ranked]
    references = [label2id.get(relation, -1) for relation in gold]
    if -1 in references:
        logger.warning("the input has relations the model does not know: no scores computed")
        return {}
    return evaluate.load(metric_path("re_micro_f1")).compute(
        predictions=predictions, references=references, none_id=label2id[NO_RELATION], num_labels=len(label2id)
    )


def check_arguments(args: argparse.Namespace, task: str) -> None:
    """
    Refuses, before any example is read, an output file that could not be written, and relation settings that the
    model's task or relations do not allow.
    """
    if Path(args.output).resolve() == Path(args.input).resolve():
        raise ValueError(f"--output {args.output} would overwrite the input file")
    check_output_file(args.output, "--output")
    if task == "ner":
        given = [f"--{name}" for name in ("top_k", "rel2id") if getattr(args, name) is not None]
        if given:
            raise ValueError(f"{' and '.join(given)}: settings of relation models, but {args.model} is an NER model")
    if args.top_k is None:
        return
    num_relations = AutoConfig.from_pretrained(args.model).num_labels
    if args.top_k > num_relations:
        raise ValueError(f"--top_k must be at most {num_relations}, the relations of {args.model}; got {args.top_k}")


def predict(argv: list[str] | None = None) -> dict[str, float]:
    """Runs the command with `argv`; returns the scores against the file's own labels."""
    args = parse_arguments(argv)
    task = task_of(args.model)
    check_arguments(args, task)
    scores = predict_ner(args) if task == "ner" else predict_re(args)
    logger.info("wrote %s", args.output)
    if scores:
        print(json.dumps({name: round(value, 4) for name, value in scores.items()}))
    return scores


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(format="%(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    predict(argv)


if __name__ == "__main__":
    main()
