"""
Robustness to irrelevant images (the paper's error-sensitivity claim, section 4.4): scores a trained model on one
split with its real images, with every example's images (global image and crops) taken from another example, with
every present image replaced by a blank one (uniform gray: zero after normalization) and with every image masked
(the text-only result). Writes `robustness.md` and `robustness.json` and prints the table.

    python -m hvpnet_hf.analysis.robustness --model outputs/demo/image_aware --output_dir outputs/robustness
    python -m hvpnet_hf.analysis.robustness --model outputs/mnre --data_file data/txt/ours_test.txt \\
        --image_dir data/img_org/test --object_dir data/img_vg/test/crops --object_map data/txt/mre_test_dict.pth
"""

import argparse
from collections.abc import Callable
from pathlib import Path

import evaluate
import numpy as np
import torch
from datasets import Dataset
from transformers import PreTrainedModel

from ..loading import NO_RELATION, labels_on_model_ids
from ..metrics import align_word_predictions, metric_path
from ..processing_hvpnet import HVPNetProcessor
from .data import add_data_arguments, batches, check_arguments, load_examples, load_model
from .reporting import format_score, write_report


def derangement(size: int, seed: int) -> np.ndarray:
    """A seeded permutation of `range(size)` that moves every index (size >= 2): index i takes from result[i]."""
    if size < 2:
        raise ValueError(f"shuffling images across examples needs at least 2 examples, got {size}")
    order = np.random.default_rng(seed).permutation(size)
    source = np.empty(size, dtype=int)
    source[order] = np.roll(order, -1)  # each example in the shuffled cycle takes the next one's images
    return source


def shuffle_images(examples: Dataset, seed: int) -> Dataset:
    """`examples` with each row's image and crops taken from another row."""
    source = derangement(len(examples), seed).tolist()
    images, objects = examples["image"], examples["objects"]
    return examples.map(
        lambda _, index: {"image": images[source[index]], "objects": objects[source[index]]}, with_indices=True
    )


def blank_images(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every image a uniform gray one (zero pixels after normalization); which images are present is unchanged."""
    return {**batch, "pixel_values": torch.zeros_like(batch["pixel_values"])}


def mask_images(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every image masked: the model sees the text only."""
    return {**batch, "image_mask": torch.zeros_like(batch["image_mask"])}


@torch.no_grad()
def score(
    task: str,
    model: PreTrainedModel,
    processor: HVPNetProcessor,
    examples: Dataset,
    batch_size: int,
    change: Callable[[dict], dict] | None = None,
) -> dict[str, float]:
    """Precision, recall and F1 of `model` on `examples`, each batch first passed through `change` if given."""
    id2label = model.config.id2label
    predictions, references = [], []
    for batch, rows in batches(examples, processor, batch_size):
        batch = change(batch) if change is not None else batch
        labels = batch.pop("labels")
        outputs = model(**batch)
        if task == "ner":
            gold = [[id2label[tag] for tag in examples[row]["ner_tags"]] for row in rows]
            tags = model.decode(outputs.logits, batch["word_start_mask"])
            predicted, gold, _ = align_word_predictions(tags.numpy(), labels.numpy(), gold, id2label)
        else:
            predicted, gold = outputs.logits.argmax(-1).tolist(), labels.tolist()
        predictions += predicted
        references += gold
    if task == "ner":
        scores = evaluate.load(metric_path("ner_seqeval")).compute(predictions=predictions, references=references)
    else:
        scores = evaluate.load(metric_path("re_micro_f1")).compute(
            predictions=predictions,
            references=references,
            none_id=model.config.label2id[NO_RELATION],
            num_labels=len(id2label),
        )
    return {name: float(scores[name]) for name in ("precision", "recall", "f1")}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="draws which example's images each example gets")
    parser.add_argument("--output_dir", default="outputs/robustness")
    args = parser.parse_args(argv)
    check_arguments(args)
    task, processor, model = load_model(args.model)
    column = "ner_tags" if task == "ner" else "relation"
    examples = labels_on_model_ids(load_examples(task, args), column, model.config.id2label, args.model)
    conditions = {
        "real images": (examples, None),
        "images shuffled across examples": (shuffle_images(examples, args.seed), None),
        "blank images": (examples, blank_images),
        "images masked (text only)": (examples, mask_images),
    }
    results = {
        name: score(task, model, processor, data, args.batch_size, change)
        for name, (data, change) in conditions.items()
    }
    lines = ["| images | precision | recall | F1 |", "|---|---|---|---|"]
    lines += [
        f"| {name} | " + " | ".join(format_score(scores[metric]) for metric in ("precision", "recall", "f1")) + " |"
        for name, scores in results.items()
    ]
    report = {"model": args.model, "examples": len(examples), "seed": args.seed, "scores": results}
    write_report(Path(args.output_dir), "robustness", "\n".join(lines), report)
    return results


if __name__ == "__main__":
    main()
