"""
`hvpnet-predict`: runs a trained HVPNeT model over a file of examples in its published format and writes the
predictions.

    hvpnet-predict --model outputs/t15 --input data/twitter2015/test.txt --image_dir data/twitter2015_images \\
        --output t15_test_predictions.txt
    hvpnet-predict --model outputs/mnre --input data/txt/ours_test.txt --image_dir data/img_org \\
        --object_dir data/img_vg --output mnre_test.jsonl

Image and crop folders are found as the example scripts find them (`hvpnet_hf.loading.find_release_layout`): a folder
laid out per split (`img_org/{train,val,test}/`, `img_vg/{train,val,test}/crops/`) gives the folder of the input's
split, read from the input's name (`ours_test.txt`, `valid.txt`); the crop map `*_<split>_dict.pth` is found next to
the input file, or named with `--object_map`.

The task follows from the model. NER input: `IMGID:` blocks of `token<TAB>label` lines (Twitter-2015/2017); output:
CoNLL columns `word gold predicted`, a blank line after each sentence (whitespace inside a word is written as `_`,
an empty word as `_`, so that every line has three columns). RE input: one MNRE record per line; output:
one JSON object per example with the entity pair, the gold and the predicted relation and its probability (with
`--top_k`, the k best relations). Every input example gets exactly one output entry, in input order. The file's own
labels are only copied to the output; when they are present the entity or relation scores are printed too.
"""

import argparse
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import evaluate
from datasets import Dataset, DatasetDict
from transformers import AutoConfig, pipeline

from . import pipelines  # noqa: F401  (registers "multimodal-ner" and "multimodal-re")
from .loading import NO_RELATION, find_object_maps, load_mner_dataset, load_mre_dataset, split_folders, split_of_file
from .metrics import metric_path
from .prediction_files import write_ner_predictions, write_re_predictions

logger = logging.getLogger(__name__)
TASK_OF_ARCHITECTURE = {"HVPNetForTokenClassification": "ner", "HVPNetForSequenceClassification": "re"}


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hvpnet-predict", description=__doc__.strip().splitlines()[0])
    parser.add_argument("--model", required=True, help="folder (or Hub id) of a trained HVPNeT model")
    parser.add_argument("--input", required=True, help="data file in the published format")
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
    parser.add_argument("--top_k", type=int, default=None, help="RE: write the k most probable relations")
    return parser.parse_args(argv)


def task_of(model: str) -> str:
    architectures = AutoConfig.from_pretrained(model).architectures or []
    tasks = {TASK_OF_ARCHITECTURE[name] for name in architectures if name in TASK_OF_ARCHITECTURE}
    if len(tasks) != 1:
        raise ValueError(f"{model}: expected an HVPNeT NER or RE model, found architectures {architectures}")
    return tasks.pop()


def bio_tags(entities: list[dict], num_words: int) -> list[str]:
    """BIO tags of one sentence from the pipeline's entities."""
    tags = ["O"] * num_words
    for entity in entities:
        tags[entity["word_start"]] = f"B-{entity['entity_group']}"
        for index in range(entity["word_start"] + 1, entity["word_end"]):
            tags[index] = f"I-{entity['entity_group']}"
    return tags


def input_sources(args: argparse.Namespace) -> dict[str, Any]:
    """
    The image folder, crop folder and crop map of the input file, as keyword arguments of the loaders (the input is
    read as their `test` split): folders laid out per split give the input's split, and the crop map is
    `--object_map` or the input's `*_<split>_dict.pth` next to it.
    """
    split = split_of_file(args.input)
    object_map = args.object_map
    if object_map is None and args.object_dir is not None:
        try:
            maps = find_object_maps(Path(args.input).parent)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"{error}; name the crop map of {args.input} with --object_map") from error
        object_map = _of_split(maps, split, args.input, "the crop maps")
    return {
        "image_dir": _of_split(split_folders(args.image_dir), split, args.input, f"--image_dir {args.image_dir}"),
        "object_dir": _of_split(split_folders(args.object_dir), split, args.input, f"--object_dir {args.object_dir}"),
        "object_maps": {"test": object_map} if object_map else None,
    }


def _of_split(found: Any, split: str | None, input_file: str, what: str) -> Any:
    """The entry of `split` when `found` is per split (a dict), else `found` itself."""
    if not isinstance(found, dict):
        return found
    if split not in found:
        raise ValueError(
            f"{what} is laid out per split ({', '.join(sorted(found))}), but the split of --input {input_file} is "
            f"{'not among them' if split else 'not named in its file name'}; give the folder or file of its split"
        )
    return found[split]


def load_input(args: argparse.Namespace, loader: Callable[..., DatasetDict], **task_arguments: Any) -> Dataset:
    """The input file's examples, read with `loader` (`load_mner_dataset` or `load_mre_dataset`)."""
    return loader(
        data_files={"test": args.input}, **input_sources(args), missing_images=args.missing_images, **task_arguments
    )["test"]


def predict_ner(args: argparse.Namespace) -> dict[str, float]:
    examples = load_input(args, load_mner_dataset)
    tagger = pipeline("multimodal-ner", model=args.model)
    inputs = ({"words": row["tokens"], "image": row["image"], "objects": row["objects"]} for row in examples)
    outputs: Iterator = tagger(inputs, batch_size=args.batch_size, missing_images=args.missing_images)
    names = examples.features["ner_tags"].feature.names
    predictions = [bio_tags(entities, len(row["tokens"])) for row, entities in zip(examples, outputs, strict=True)]
    references = [[names[tag] for tag in tags] for tags in examples["ner_tags"]]
    write_ner_predictions(args.output, zip(examples["tokens"], references, predictions, strict=True))
    return evaluate.load(metric_path("ner_seqeval")).compute(predictions=predictions, references=references)


def predict_re(args: argparse.Namespace) -> dict[str, float]:
    examples = load_input(args, load_mre_dataset, rel2id=args.rel2id)
    classifier = pipeline("multimodal-re", model=args.model)
    label2id = classifier.model.config.label2id
    inputs = (
        {
            "words": row["tokens"],
            "head": row["head"],
            "tail": row["tail"],
            "image": row["image"],
            "objects": row["objects"],
        }
        for row in examples
    )
    outputs: Iterator = classifier(
        inputs, batch_size=args.batch_size, top_k=args.top_k or 1, missing_images=args.missing_images
    )
    names = examples.features["relation"].names
    ranked = list(outputs)
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


def predict(argv: list[str] | None = None) -> dict[str, float]:
    """Runs the command with `argv`; returns the scores against the file's own labels."""
    args = parse_arguments(argv)
    if Path(args.output).resolve() == Path(args.input).resolve():
        raise ValueError(f"--output {args.output} would overwrite the input file")
    scores = predict_ner(args) if task_of(args.model) == "ner" else predict_re(args)
    logger.info("wrote %s", args.output)
    if scores:
        print(json.dumps({name: round(value, 4) for name, value in scores.items()}))
    return scores


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(format="%(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    predict(argv)


if __name__ == "__main__":
    main()
