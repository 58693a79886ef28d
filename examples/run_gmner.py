#!/usr/bin/env python
"""
Fine-tunes HVPNeT for grounded multimodal NER (Twitter-GMNER, or the bundled grounding set) with `Trainer`: the NER
head and a region scorer (`HVPNetForGroundedTokenClassification`), trained on the gold spans with region targets from
the candidates' IoU with the gold boxes.

    python examples/run_gmner.py examples/configs/demo_gmner.yaml --text_model_name_or_path <MiniLM folder>
    python examples/run_gmner.py examples/configs/twitter_gmner.yaml --num_candidates 18

A single `.json` / `.yaml` file gives the settings; command-line flags after it override them. The checkpoint is
selected on the validation loss (CRF and region loss). Each scored split is predicted on the model's own spans, and
the run prints and writes to `<output_dir>/all_results.json` the GMNER / MNER / EEG scores (`gmner_f1`) of the model
and of three baselines that ground the same predicted entities in the same candidates: every entity's region is none
(`none`), the largest candidate (`largest`) or the detector's first candidate (`first`); and the candidate recall
(the share of groundable entities with a candidate above IoU 0.5, which bounds EEG recall). The output folder
receives the model, the processor, `all_results.json`, the model card `README.md` (once validation is scored; with
`--push_to_hub` the folder is published with it) and `{validation,test}_predictions.jsonl` (one tweet a line: its
words and its entities, each with its `box` in image pixels, or null, and `region_score`).
"""

import json
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import evaluate
import torch
from datasets import Dataset, List, Value
from transformers import HfArgumentParser

from hvpnet_hf import HVPNetForGroundedTokenClassification
from hvpnet_hf.grounding_data import (
    DEFAULT_NUM_CANDIDATES,
    candidate_boxes_file,
    candidate_matches,
    candidate_recall,
    load_gmner_dataset,
)
from hvpnet_hf.loading import SPLIT_ALIASES, check_images_found_in_splits, find_release_layout
from hvpnet_hf.metrics import metric_path
from hvpnet_hf.model_card import SPLIT_PREFIXES, save_model_card_and_push
from hvpnet_hf.modeling_hvpnet import region_targets
from hvpnet_hf.output_files import atomic_write
from hvpnet_hf.prediction_files import gmner_record
from hvpnet_hf.sample_data import sample_sources
from hvpnet_hf.script_utils import (
    TRAINING_DEFAULTS,
    DataTrainingArguments,
    ModelArguments,
    build_trainer,
    check_range,
    encode_splits,
    load_processor_and_model,
    parse_settings_and_flags,
    select_splits,
    start_run,
    train_and_save,
)
from hvpnet_hf.training import HVPNetTrainer, HVPNetTrainingArguments

logger = logging.getLogger(__name__)

# Settings that differ from `TrainingArguments`' defaults (a config file or flag overrides them).
SCRIPT_DEFAULTS = {
    **TRAINING_DEFAULTS,
    "per_device_train_batch_size": 8,
    "learning_rate": 3e-5,
    # The CRF, the emission layer and the region scorer at run_mner.py's head learning rate.
    "head_learning_rate": 5e-2,
    "num_train_epochs": 30,
    # Validation is scored on its loss during training (CRF and region loss); the F1 scores need the model's own
    # spans grounded, which the script does once training is over.
    "metric_for_best_model": "loss",
    "prediction_loss_only": True,
}
# How each baseline picks an entity's region among its image's candidates (the same region for every entity).
BASELINES = ("none", "largest", "first")
SCORES = ("gmner", "mner", "eeg")
# The batch keys that are training targets, left out when the model predicts.
TARGETS = ("labels", "entity_spans", "region_labels")
# What the images are needed for, said when not one image of a split is found.
NEEDS_IMAGES = "grounding chooses among the image's crops, so it needs the images"


@dataclass
class GmnerDataArguments(DataTrainingArguments):
    # The words and tags are encoded as for NER; the entities' boxes and the candidates are read here.
    task = "ner"

    dataset: str = field(
        default="twitter_gmner",
        metadata={
            "help": "Name of the data set. 'sample' reads the bundled grounding set; any other name reads "
            "Twitter-GMNER's format from --data_dir, --xml_dir and --object_dir."
        },
    )
    xml_dir: str | None = field(default=None, metadata={"help": "The release's xml/ folder of box files."})
    num_candidates: int = field(
        default=DEFAULT_NUM_CANDIDATES,
        metadata={
            "help": "The most candidate regions kept per image (the first); a new model gets as many crop slots "
            "(num_object_images)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "num_candidates", 1)
        if self.own_data or self.streaming or self.mask_images:
            raise ValueError(
                "run_gmner.py reads Twitter-GMNER's format (--data_dir, --xml_dir, --object_dir) with its images: "
                "--dataset_name, table files, --streaming and --mask_images are not for grounding"
            )
        flags = ("data_dir", "xml_dir", "object_dir")
        if self.dataset == "sample":
            given = [f"--{name}" for name in (*flags, "image_dir", "object_map_dir") if getattr(self, name)]
            given += [f"--{split}_file" for split in self.data_files or {}]
            if given:
                raise ValueError(f"dataset is 'sample' (the bundled grounding set), but {', '.join(given)} name data")
        else:
            missing = [f"--{name}" for name in flags if getattr(self, name) is None]
            if missing:
                raise ValueError(f"dataset {self.dataset!r} needs {', '.join(missing)} (or use --dataset sample)")

    def load_release(self, **sources: Any) -> datasets.DatasetDict:
        return load_gmner_dataset(
            xml_dir=self.xml_dir, num_candidates=self.num_candidates, missing_images=self.missing_images, **sources
        )


def parse_arguments(argv: list[str]) -> tuple[ModelArguments, GmnerDataArguments, HVPNetTrainingArguments]:
    """Flags, optionally after one JSON or YAML file whose settings they override."""
    parser = HfArgumentParser((ModelArguments, GmnerDataArguments, HVPNetTrainingArguments))
    parser.set_defaults(**SCRIPT_DEFAULTS)
    return parse_settings_and_flags(parser, argv)


def check_run(model_args: ModelArguments, data_args: GmnerDataArguments, training_args: HVPNetTrainingArguments):
    """Refuses, before any work, what the script cannot do, and gives a new model one crop slot per candidate."""
    if training_args.world_size > 1 and (training_args.do_eval or training_args.do_predict):
        raise ValueError(
            "run_gmner.py predicts the scored splits in one process: train with --do_eval false --do_predict false "
            "here, then score with --model_name_or_path <output_dir> --do_train false in one process"
        )
    if model_args.model_name_or_path is None:
        slots = model_args.config_settings.setdefault("num_object_images", data_args.num_candidates)
        if slots != data_args.num_candidates:
            raise ValueError(
                f"config_overrides num_object_images={slots} differs from num_candidates={data_args.num_candidates}:"
                " each candidate is a crop slot; set num_candidates only"
            )


def load_splits(data_args: GmnerDataArguments, training_args: HVPNetTrainingArguments) -> datasets.DatasetDict:
    """The splits with their entities' gold boxes and their images' candidates (crops and boxes), sampled and cut
    as asked (`select_splits`)."""
    if data_args.dataset == "sample":
        sources = sample_sources("gmner")
        data_args.xml_dir = sources.pop("xml_dir")
        splits = data_args.load_release(**sources)
    else:
        layout = find_release_layout(
            data_args.image_dir, data_args.object_dir, data_args.object_map_dir or data_args.object_dir
        )
        boxes = {split: candidate_boxes_file(data_args.object_dir, names[0]) for split, names in SPLIT_ALIASES.items()}
        splits = data_args.load_release(
            data_dir=data_args.data_dir,
            data_files=data_args.data_files,
            candidate_boxes={split: path for split, path in boxes.items() if path.is_file()},
            **layout,
        )
        check_images_found_in_splits(splits, layout["image_dir"], "image_dir", NEEDS_IMAGES)
    select_splits(splits, data_args, training_args)
    return splits


def add_region_targets(batch: Mapping[str, list], num_slots: int) -> dict[str, list]:
    """
    Batched `datasets.map` function on tokenized examples: `entity_spans`, the word spans `[start, end)` of the gold
    entities the tokens kept, and `region_labels`, each one's target over the `num_slots` candidates and "none"
    (`region_targets` of the candidates above IoU 0.5 with its gold boxes).
    """
    spans, targets = [], []
    for entities, candidates, word_starts in zip(
        batch["entities"], batch["candidate_boxes"], batch["word_start_mask"], strict=True
    ):
        kept = [entity for entity in entities if entity["end"] <= sum(word_starts)]
        spans.append([[entity["start"], entity["end"]] for entity in kept])
        matches = [candidate_matches(candidates[:num_slots], entity["boxes"]) for entity in kept]
        padded = [torch.nn.functional.pad(found, (0, num_slots - len(found))) for found in matches]
        targets.append([region_targets(found).tolist() for found in padded])
    return {"entity_spans": spans, "region_labels": targets}


def with_region_targets(encoded: Dataset, num_slots: int) -> Dataset:
    """The tokenized split `encoded` with the `entity_spans` and `region_labels` of `add_region_targets`."""
    targets = {"entity_spans": List(List(Value("int64"))), "region_labels": List(List(Value("float32")))}
    return encoded.map(
        add_region_targets,
        batched=True,
        fn_kwargs={"num_slots": num_slots},
        features=datasets.Features({**encoded.features, **targets}),
        desc="Region targets",
    )


class GroundingCollator:
    """The batch of an `HVPNetDataCollator` with the entities to ground: `entity_spans` (B, E, 2), padded with
    (-100, -100), and `region_labels` (B, E, K + 1), padded with zeros."""

    def __init__(self, collator, num_slots: int):
        self.collator = collator
        self.num_slots = num_slots

    def __call__(self, features: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        batch = self.collator(features)
        num_entities = max(len(feature["entity_spans"]) for feature in features)
        spans = torch.full((len(features), num_entities, 2), -100, dtype=torch.long)
        labels = torch.zeros(len(features), num_entities, self.num_slots + 1)
        for row, feature in enumerate(features):
            found = len(feature["entity_spans"])
            if found:
                spans[row, :found] = torch.tensor(feature["entity_spans"])
                labels[row, :found] = torch.tensor(feature["region_labels"])
        return {**batch, "entity_spans": spans, "region_labels": labels}


def predict_entities(trainer: HVPNetTrainer, split: Dataset) -> list[list[dict]]:
    """Per example of the encoded `split`, the model's own entities, each grounded (see `decode_entities`)."""
    model = trainer.model.eval()
    found = []
    for batch in trainer.get_test_dataloader(split):
        with torch.no_grad():
            outputs = model(**{name: value for name, value in batch.items() if name not in TARGETS})
        found += model.decode_entities(outputs, batch["word_start_mask"])
    return found


def with_boxes(entities: Sequence[Mapping], candidate_boxes: Sequence[Sequence[float]]) -> list[dict]:
    """The decoded `entities` with the `box` of their chosen candidate (or None) and its `region_score`."""
    return [
        {
            "start": entity["start"],
            "end": entity["end"],
            "type": entity["type"],
            "box": None if entity["candidate"] is None else list(candidate_boxes[entity["candidate"]]),
            "region_score": entity["score"],
        }
        for entity in entities
    ]


def baseline_region(rule: str, candidate_boxes: Sequence[Sequence[float]]) -> list[float] | None:
    """The region the baseline `rule` gives every entity of an image with `candidate_boxes`: none, the largest
    candidate (the first of equal ones) or the first; none when the image has no candidate."""
    if rule not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {rule!r}")
    if rule == "none" or not candidate_boxes:
        return None
    if rule == "first":
        return list(candidate_boxes[0])
    return list(max(candidate_boxes, key=lambda box: (box[2] - box[0]) * (box[3] - box[1])))


def ground_with_baseline(
    entities: Sequence[Mapping], candidate_boxes: Sequence[Sequence[float]], rule: str
) -> list[dict]:
    """`entities` (`start`, `end`, `type`) each with the `box` of the baseline `rule`."""
    box = baseline_region(rule, candidate_boxes)
    return [
        {"start": entity["start"], "end": entity["end"], "type": entity["type"], "box": box} for entity in entities
    ]


def score_regions(
    split: Dataset, predicted: Sequence[Sequence[Mapping]], num_slots: int
) -> dict[str, dict[str, float]]:
    """`gmner_f1` scores of the predicted entities (`start`, `end`, `type`, `box`) of each example of `split`
    (`model`), and of the baselines' regions for the same entities in the same candidates (the first `num_slots`)."""
    metric = evaluate.load(metric_path("gmner_f1"))
    references = [
        [{key: entity[key] for key in ("start", "end", "type", "boxes")} for entity in entities]
        for entities in split["entities"]
    ]
    spans = [
        [{key: entity[key] for key in ("start", "end", "type", "box")} for entity in found] for found in predicted
    ]
    scores = {"model": metric.compute(predictions=spans, references=references)}
    for rule in BASELINES:
        grounded = [
            ground_with_baseline(found, candidates[:num_slots], rule)
            for found, candidates in zip(spans, split["candidate_boxes"], strict=True)
        ]
        scores[f"baseline {rule}"] = metric.compute(predictions=grounded, references=references)
    return scores


def format_table(split: str, recall: float, scores: Mapping[str, Mapping[str, float]]) -> str:
    rows = [
        f"{split} (candidate recall {100 * recall:.2f}):",
        "| regions | GMNER F1 | MNER F1 | EEG F1 |",
        "|---|---|---|---|",
    ]
    for name, found in scores.items():
        rows.append(f"| {name} | " + " | ".join(f"{100 * found[f'{score}_f1']:.2f}" for score in SCORES) + " |")
    return "\n".join(rows)


def write_predictions(path: Path, split: Dataset, predicted: Sequence[Sequence[Mapping]]) -> None:
    """One JSON line per example, as `hvpnet-predict` writes them (`prediction_files.gmner_record`)."""
    with atomic_write(path) as temporary, open(temporary, "w", encoding="utf-8") as file:
        for example, entities in zip(split, predicted, strict=True):
            file.write(gmner_record(example, entities))


def main(argv: list[str] | None = None) -> dict[str, float]:
    model_args, data_args, training_args = parse_arguments(sys.argv[1:] if argv is None else argv)
    check_run(model_args, data_args, training_args)
    # Logging, the reused output folder (refused, replaced or continued) and the seed.
    push_to_hub = start_run(training_args, data_args, logger)

    # Load the splits: every entity with its gold boxes, every image with its candidates (crops and boxes).
    raw_datasets = load_splits(data_args, training_args)

    # Load the processor and the model: a trained folder, or a new model with one crop slot per candidate.
    processor, model = load_processor_and_model(
        model_args, data_args, HVPNetForGroundedTokenClassification, raw_datasets
    )
    num_slots = model.config.num_object_images
    if num_slots < data_args.num_candidates:
        raise ValueError(
            f"the model {model.name_or_path} has {num_slots} crop slots, fewer than num_candidates="
            f"{data_args.num_candidates}: pass --num_candidates {num_slots} or less"
        )

    # Labels on the model's ids, tokenized, then the gold entities' spans and region targets.
    raw_datasets, encoded_datasets = encode_splits(raw_datasets, processor, model, data_args, training_args)
    with training_args.main_process_first(desc="region targets"):
        encoded_datasets = datasets.DatasetDict(
            {split: with_region_targets(encoded, num_slots) for split, encoded in encoded_datasets.items()}
        )
    trainer = build_trainer(model, processor, encoded_datasets, data_args, training_args, None)
    trainer.data_collator = GroundingCollator(trainer.data_collator, num_slots)

    # Training
    results: dict[str, float] = {}
    if training_args.do_train:
        results.update(train_and_save(trainer, training_args, encoded_datasets["train"]))

    # Prediction on the model's own spans (validation, test), scored with the baselines on the same entities
    asked = {"validation": training_args.do_eval, "test": training_args.do_predict}
    for split in SPLIT_PREFIXES:
        if not asked[split]:
            continue
        examples = raw_datasets[split]
        decoded = predict_entities(trainer, encoded_datasets[split])
        predicted = [
            with_boxes(entities, candidates[:num_slots])
            for entities, candidates in zip(decoded, examples["candidate_boxes"], strict=True)
        ]
        recall = candidate_recall(examples)["recall"]
        scores = score_regions(examples, predicted, num_slots)
        print(format_table(split, recall, scores), flush=True)
        results[f"{split}_candidate_recall"] = recall
        for name, found in scores.items():
            prefix = f"{split}_{name.removeprefix('baseline ')}"
            results.update({f"{prefix}_{score}_f1": found[f"{score}_f1"] for score in SCORES})
        write_predictions(Path(training_args.output_dir) / f"{split}_predictions.jsonl", examples, predicted)

    output_dir = Path(training_args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "all_results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    # The model card (once validation was scored), and with --push_to_hub the folder published with it.
    save_model_card_and_push(
        trainer, "gmner", results, data_args.card_name, model_args.text_model_name_or_path, push_to_hub
    )
    return results


if __name__ == "__main__":
    main()
