"""
`hvpnet-predict`: runs a trained HVPNeT model over a file of examples in its published format and writes the
predictions.

    hvpnet-predict --model outputs/t15 --input data/twitter2015/test.txt --image_dir data/twitter2015_images \\
        --output t15_test_predictions.txt
    hvpnet-predict --model outputs/mnre --input data/txt/ours_test.txt --image_dir data/img_org/test \\
        --object_dir data/img_vg/test/crops --object_map data/txt/mre_test_dict.pth --output mnre_test.jsonl

The task follows from the model. NER input: `IMGID:` blocks of `token<TAB>label` lines (Twitter-2015/2017); output:
CoNLL columns `word gold predicted`, a blank line after each sentence (whitespace inside a word is written as `_`,
an empty word as `_`, so that every line has three columns). RE input: one MNRE record per line; output:
one JSON object per example with the entity pair, the gold and the predicted relation and its probability (with
`--top_k`, the k best relations). Every input example gets exactly one output entry, in input order. The file's own
labels are only copied to the output; when they are present the entity or relation scores are printed too.
"""

import argparse
import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import evaluate
from datasets import Dataset, DatasetDict
from transformers import AutoConfig, pipeline

from . import pipelines  # noqa: F401  (registers "multimodal-ner" and "multimodal-re")
from .loading import NO_RELATION, load_mner_dataset, load_mre_dataset
from .metrics import metric_path

logger = logging.getLogger(__name__)
TASK_OF_ARCHITECTURE = {"HVPNetForTokenClassification": "ner", "HVPNetForSequenceClassification": "re"}


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hvpnet-predict", description=__doc__.strip().splitlines()[0])
    parser.add_argument("--model", required=True, help="folder (or Hub id) of a trained HVPNeT model")
    parser.add_argument("--input", required=True, help="data file in the published format")
    parser.add_argument("--output", required=True, help="file to write the predictions to")
    parser.add_argument("--image_dir", help="folder of the images named in the input file (none: text only)")
    parser.add_argument("--object_dir", help="folder of the object crops")
    parser.add_argument("--object_map", help="torch.save'd crop map of this file (needs --object_dir)")
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


def conll_row(word: str, gold: str, predicted: str) -> str:
    """One `word gold predicted` line; the word's whitespace becomes `_` (an empty word is `_`), keeping 3 columns."""
    return f"{'_'.join(word.split()) or '_'} {gold} {predicted}\n"


def bio_tags(entities: list[dict], num_words: int) -> list[str]:
    """BIO tags of one sentence from the pipeline's entities."""
    tags = ["O"] * num_words
    for entity in entities:
        tags[entity["word_start"]] = f"B-{entity['entity_group']}"
        for index in range(entity["word_start"] + 1, entity["word_end"]):
            tags[index] = f"I-{entity['entity_group']}"
    return tags


@contextlib.contextmanager
def atomic_output(path: str) -> Iterator:
    """
    A text file that becomes `path` only when the block ends without an error (written as `path.partial`, then
    renamed over `path`), so a failed run leaves neither an empty nor a partial prediction file.
    """
    temporary = f"{path}.partial"
    try:
        with open(temporary, "w", encoding="utf-8") as file:
            yield file
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def load_input(args: argparse.Namespace, loader: Callable[..., DatasetDict], **task_arguments: Any) -> Dataset:
    """The input file's examples, read with `loader` (`load_mner_dataset` or `load_mre_dataset`)."""
    return loader(
        data_files={"test": args.input},
        image_dir=args.image_dir,
        object_dir=args.object_dir,
        object_maps={"test": args.object_map} if args.object_map else None,
        missing_images=args.missing_images,
        **task_arguments,
    )["test"]


def predict_ner(args: argparse.Namespace) -> dict[str, float]:
    examples = load_input(args, load_mner_dataset)
    tagger = pipeline("multimodal-ner", model=args.model)
    inputs = ({"words": row["tokens"], "image": row["image"], "objects": row["objects"]} for row in examples)
    outputs: Iterator = tagger(inputs, batch_size=args.batch_size, missing_images=args.missing_images)
    names = examples.features["ner_tags"].feature.names
    predictions, references = [], []
    with atomic_output(args.output) as file:
        for row, entities in zip(examples, outputs, strict=True):
            predicted = bio_tags(entities, len(row["tokens"]))
            gold = [names[tag] for tag in row["ner_tags"]]
            file.writelines(conll_row(*columns) for columns in zip(row["tokens"], gold, predicted, strict=True))
            file.write("\n")
            predictions.append(predicted)
            references.append(gold)
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
    predictions, references = [], []
    with atomic_output(args.output) as file:
        for row, ranked in zip(examples, outputs, strict=True):
            gold = names[row["relation"]]
            record = {"id": row["id"], "head": row["head"], "tail": row["tail"], "gold": gold}
            record.update({"predicted": ranked[0]["relation"], "score": round(ranked[0]["score"], 4)})
            if args.top_k:
                record["top_k"] = [{**item, "score": round(item["score"], 4)} for item in ranked]
            file.write(json.dumps(record, ensure_ascii=False) + "\n")
            predictions.append(label2id[ranked[0]["relation"]])
            references.append(label2id.get(gold, -1))
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
