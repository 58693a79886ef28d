#!/usr/bin/env python
"""
Fine-tunes HVPNeT for multimodal named entity recognition (Twitter-2015, Twitter-2017, CMNER, the bundled sample
set, or a data set of your own) with `Trainer`.

    python examples/run_mner.py examples/configs/twitter2015.yaml
    python examples/run_mner.py examples/configs/twitter2015.yaml --learning_rate 1e-5 --output_dir outputs/t15
    python examples/run_mner.py examples/configs/twitter2015.yaml --config_overrides "prefix_mode=flat,prefix_grid=3"
    accelerate launch examples/run_mner.py examples/configs/twitter2017.yaml
    python examples/run_mner.py --dataset my_posts --train_file train.jsonl --validation_file dev.jsonl \\
        --test_file test.jsonl --text_column_name words --label_column_name tags --output_dir outputs/my_posts

A single `.json` / `.yaml` file gives the settings; command-line flags after it override them. The checkpoint is
selected on validation F1 only; test is evaluated once, at the end. The output folder receives the model, the
processor, the model card (`README.md`), `all_results.json` and `{validation,test}_predictions.txt` (CoNLL columns:
word, gold tag, predicted tag).
"""

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import evaluate
from transformers import EvalPrediction, HfArgumentParser

from hvpnet_hf import HVPNetForTokenClassification
from hvpnet_hf.loading import load_cmner_dataset, load_mner_dataset
from hvpnet_hf.metrics import align_word_predictions, metric_path
from hvpnet_hf.model_card import SPLIT_PREFIXES, save_model_card_and_push
from hvpnet_hf.prediction_files import write_ner_predictions
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
    "per_device_train_batch_size": 8,
    "learning_rate": 3e-5,
    # The CRF and emission layer at 5e-2, as in the authors' released trainer: at the body's 3e-5 the CRF barely moves
    # in a short run (docs/training.md, "Training recipe").
    "head_learning_rate": 5e-2,
    "num_train_epochs": 30,
}


@dataclass
class NerDataArguments(DataTrainingArguments):
    task = "ner"

    dataset: str = field(
        default="twitter2015",
        metadata={
            "help": "Name of the data set, written in the model card (known: twitter2015, twitter2017, cmner, sample; "
            "any name of your own works). 'cmner' reads CMNER's published files; 'sample' without data_dir or data "
            "files uses the bundled sample set."
        },
    )
    label_column_name: str = field(
        default="ner_tags",
        metadata={"help": "Own data: the column of the tags (BIO tag names, or a ClassLabel sequence), one per word."},
    )

    def load_release(self, **sources: Any) -> datasets.DatasetDict:
        return (load_cmner_dataset if self.dataset == "cmner" else load_mner_dataset)(**sources)


def parse_arguments(argv: list[str]) -> tuple[ModelArguments, NerDataArguments, HVPNetTrainingArguments]:
    """Flags, optionally after one JSON or YAML file whose settings they override."""
    parser = HfArgumentParser((ModelArguments, NerDataArguments, HVPNetTrainingArguments))
    parser.set_defaults(**SCRIPT_DEFAULTS)
    return parse_settings_and_flags(parser, argv)


def build_compute_metrics(gold_tags: list[list[str]], id2label: dict[int, str]):
    """`compute_metrics` for one split: word-level entity scores against the split's full gold tag lists."""
    seqeval = evaluate.load(metric_path("ner_seqeval"))

    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        predictions, references, num_truncated = align_word_predictions(
            prediction.predictions, prediction.label_ids, gold_tags, id2label
        )
        return {**seqeval.compute(predictions=predictions, references=references), "truncated_words": num_truncated}

    return compute_metrics


def main(argv: list[str] | None = None) -> dict[str, float]:
    model_args, data_args, training_args = parse_arguments(sys.argv[1:] if argv is None else argv)
    # Logging, the reused output folder (refused, replaced or continued) and the seed.
    push_to_hub = start_run(training_args, data_args, logger)

    # Load the splits: a release with its images, crops and crop maps, or a data set of your own.
    raw_datasets = load_splits(model_args, data_args, training_args)

    # Load the processor and the model: a trained folder, or a new model with the data's labels.
    processor, model = load_processor_and_model(model_args, data_args, HVPNetForTokenClassification, raw_datasets)
    id2label = model.config.id2label

    # Labels on the model's ids, then tokenized; images stay paths for the collator to decode.
    raw_datasets, encoded_datasets = encode_splits(raw_datasets, processor, model, data_args, training_args)
    # The gold word tags of the splits that are scored (a streamed split is read once for them).
    gold_tags = {
        split: [[id2label[tag] for tag in tags] for tags in column_values(raw_datasets[split], "ner_tags")]
        for split in SPLIT_PREFIXES
        if split in raw_datasets
    }
    # Only validation is scored during training; each split evaluated afterwards gets its own.
    validation_metrics = build_compute_metrics(gold_tags["validation"], id2label) if training_args.do_train else None
    trainer = build_trainer(model, processor, encoded_datasets, data_args, training_args, validation_metrics)

    # Training
    results: dict[str, float] = {}
    if training_args.do_train:
        results.update(train_and_save(trainer, training_args, encoded_datasets["train"]))

    # Evaluation (validation) and prediction (test), each with its prediction file
    asked = {"validation": training_args.do_eval, "test": training_args.do_predict}
    for split, prefix in SPLIT_PREFIXES.items():
        if not asked[split]:
            continue
        trainer.compute_metrics = build_compute_metrics(gold_tags[split], id2label)
        prediction, metrics = predict_split(trainer, encoded_datasets[split], prefix)
        results.update(metrics)
        if trainer.is_world_process_zero():
            predictions, _, _ = align_word_predictions(
                prediction.predictions, prediction.label_ids, gold_tags[split], id2label
            )
            words = column_values(raw_datasets[split], "tokens")
            sentences = zip(words, gold_tags[split], predictions, strict=True)
            write_ner_predictions(Path(training_args.output_dir) / f"{split}_predictions.txt", sentences)

    report_streamed_images(data_args)
    save_model_card_and_push(
        trainer, "ner", results, data_args.card_name, model_args.text_model_name_or_path, push_to_hub
    )
    return results


if __name__ == "__main__":
    main()
