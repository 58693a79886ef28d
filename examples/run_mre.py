#!/usr/bin/env python
"""
Fine-tunes HVPNeT for multimodal relation extraction (MNRE, the bundled sample set, or a data set of your own) with
`Trainer`.

    python examples/run_mre.py examples/configs/mnre.yaml
    python examples/run_mre.py examples/configs/mnre.yaml --learning_rate 2e-5 --output_dir outputs/mnre
    python examples/run_mre.py examples/configs/mnre.yaml --config_overrides "relation_pooling=cls"
    torchrun --nproc_per_node 2 examples/run_mre.py examples/configs/mnre.yaml
    python examples/run_mre.py --dataset_name my_pairs_folder --output_dir outputs/my_pairs

A single `.json` / `.yaml` file gives the settings; command-line flags after it override them. The checkpoint is
selected on validation F1 (micro, without `None`) only; test is evaluated once, at the end. The output folder
receives the model, the processor, the model card (`README.md`), `all_results.json` and
`{validation,test}_predictions.jsonl` (one JSON object per example: the entity pair, the gold and the predicted
relation, and the predicted relation's probability).
"""

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import evaluate
import numpy as np
import torch
from transformers import EvalPrediction, HfArgumentParser

from hvpnet_hf import HVPNetForSequenceClassification
from hvpnet_hf.loading import NO_RELATION, load_mre_dataset
from hvpnet_hf.metrics import metric_path
from hvpnet_hf.model_card import SPLIT_PREFIXES, save_model_card_and_push
from hvpnet_hf.prediction_files import write_re_predictions
from hvpnet_hf.script_utils import (
    TRAINING_DEFAULTS,
    DataTrainingArguments,
    ModelArguments,
    build_trainer,
    column_values,
    encode_splits,
    load_processor_and_model,
    load_splits,
    parse_settings_and_flags,
    predict_split,
    report_streamed_images,
    start_run,
    train_and_save,
)
from hvpnet_hf.training import HVPNetTrainingArguments

logger = logging.getLogger(__name__)

# Settings that differ from `TrainingArguments`' defaults (a config file or flag overrides them).
SCRIPT_DEFAULTS = {
    **TRAINING_DEFAULTS,
    "per_device_train_batch_size": 32,
    "learning_rate": 1e-5,
    "num_train_epochs": 12,
}


@dataclass
class MreDataArguments(DataTrainingArguments):
    task = "re"

    dataset: str = field(
        default="mnre",
        metadata={
            "help": "Name of the data set, written in the model card (known: mnre, sample; any name of your own "
            "works). 'sample' without data_dir or data files uses the bundled sample set."
        },
    )
    rel2id_file: str | None = field(default=None, metadata={"help": "JSON {relation: id} fixing the relation ids."})
    label_column_name: str = field(
        default="relation", metadata={"help": "Own data: the column of the relation (a name, or a ClassLabel)."}
    )
    head_column_name: str = field(
        default="head",
        metadata={"help": "Own data: the column of the head entity, {'start', 'end'} word offsets, end exclusive."},
    )
    tail_column_name: str = field(
        default="tail", metadata={"help": "Own data: the column of the tail entity, as the head's."}
    )

    def load_release(self, **sources: Any) -> datasets.DatasetDict:
        return load_mre_dataset(**sources, rel2id=self.rel2id_file)


def parse_arguments(argv: list[str]) -> tuple[ModelArguments, MreDataArguments, HVPNetTrainingArguments]:
    """Flags, optionally after one JSON or YAML file whose settings they override."""
    parser = HfArgumentParser((ModelArguments, MreDataArguments, HVPNetTrainingArguments))
    parser.set_defaults(**SCRIPT_DEFAULTS)
    return parse_settings_and_flags(parser, argv)


def build_compute_metrics(none_id: int, num_labels: int):
    """`compute_metrics`: micro precision, recall and F1 over all relations but `None`."""
    relation_f1 = evaluate.load(metric_path("re_micro_f1"))

    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        predicted = np.argmax(prediction.predictions, axis=-1)
        return relation_f1.compute(
            predictions=predicted, references=prediction.label_ids, none_id=none_id, num_labels=num_labels
        )

    return compute_metrics


def write_predictions(path: Path, raw_split: datasets.Dataset | datasets.IterableDataset, logits: np.ndarray) -> None:
    """One JSON object per example (see `write_re_predictions`): the pair, gold and predicted relation, probability."""
    names = raw_split.features["relation"].names
    probabilities = torch.softmax(torch.as_tensor(logits, dtype=torch.float32), dim=-1)
    scores, predicted = probabilities.max(dim=-1)
    pairs = zip(predicted.tolist(), scores.tolist(), strict=True)
    best = [[{"relation": names[label], "score": score}] for label, score in pairs]
    gold = [names[relation] for relation in column_values(raw_split, "relation")]
    write_re_predictions(path, raw_split, gold, best, top_k=False)


def main(argv: list[str] | None = None) -> dict[str, float]:
    model_args, data_args, training_args = parse_arguments(sys.argv[1:] if argv is None else argv)
    # Logging, the reused output folder (refused, replaced or continued) and the seed.
    push_to_hub = start_run(training_args, data_args, logger)

    # Load the splits: MNRE with its images, crops and crop maps, or a data set of your own.
    raw_datasets = load_splits(model_args, data_args, training_args)

    # Load the processor and the model: a trained folder, or a new model with the data's relations.
    processor, model = load_processor_and_model(model_args, data_args, HVPNetForSequenceClassification, raw_datasets)
    label_names = list(model.config.id2label.values())
    if NO_RELATION not in label_names:
        raise ValueError(f"the relation labels {label_names} lack {NO_RELATION!r}, which the metric leaves out")

    # Relations on the model's ids, then tokenized with entity markers; images stay paths for the collator.
    raw_datasets, encoded_datasets = encode_splits(raw_datasets, processor, model, data_args, training_args)
    compute_metrics = build_compute_metrics(label_names.index(NO_RELATION), len(label_names))
    trainer = build_trainer(model, processor, encoded_datasets, data_args, training_args, compute_metrics)

    # Training
    results: dict[str, float] = {}
    if training_args.do_train:
        results.update(train_and_save(trainer, training_args, encoded_datasets["train"]))

    # Evaluation (validation) and prediction (test), each with its prediction file
    asked = {"validation": training_args.do_eval, "test": training_args.do_predict}
    for split, prefix in SPLIT_PREFIXES.items():
        if asked[split]:
            prediction, metrics = predict_split(trainer, encoded_datasets[split], prefix)
            results.update(metrics)
            if trainer.is_world_process_zero():
                output_file = Path(training_args.output_dir) / f"{split}_predictions.jsonl"
                write_predictions(output_file, raw_datasets[split], prediction.predictions)

    report_streamed_images(data_args)
    save_model_card_and_push(
        trainer, "re", results, data_args.card_name, model_args.text_model_name_or_path, push_to_hub
    )
    return results


if __name__ == "__main__":
    main()
