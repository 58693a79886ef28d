#!/usr/bin/env python
"""
Fine-tunes HVPNeT for multimodal relation extraction (MNRE, or the bundled sample set) with `Trainer`.

    python examples/run_mre.py examples/configs/mnre.yaml
    python examples/run_mre.py examples/configs/mnre.yaml --learning_rate 2e-5 --output_dir outputs/mnre
    torchrun --nproc_per_node 2 examples/run_mre.py examples/configs/mnre.yaml

A single `.json` / `.yaml` file gives the settings; command-line flags after it override them. The checkpoint is
selected on validation F1 (micro, without `None`) only; test is evaluated once, at the end. The output folder
receives the model, the processor, the model card (`README.md`), `all_results.json` and
`{validation,test}_predictions.jsonl` (one JSON object per example: the entity pair, the gold and the predicted
relation, and the predicted relation's probability).
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import evaluate
import numpy as np
import torch
from transformers import EvalPrediction

from hvpnet_hf import HVPNetForSequenceClassification
from hvpnet_hf.configuration_hvpnet import RELATION_POOLINGS
from hvpnet_hf.loading import NO_RELATION, load_mre_dataset
from hvpnet_hf.metrics import metric_path
from hvpnet_hf.prediction_files import write_re_predictions
from hvpnet_hf.sample_data import sample_paths

import hvpnet_examples

# Settings of this script that differ from `TrainingArguments`' defaults (a config file or flag overrides them).
SCRIPT_DEFAULTS = {
    **hvpnet_examples.TRAINING_DEFAULTS,
    "per_device_train_batch_size": 32,
    "learning_rate": 1e-5,
    "num_train_epochs": 12,
}


@dataclass
class RelationModelArguments(hvpnet_examples.ModelArguments):
    relation_pooling: str = field(
        default=hvpnet_examples.DEFAULT_CONFIG.relation_pooling,
        metadata={
            "help": "Classify from the <s>/<o> marker states or from [CLS].",
            "choices": list(RELATION_POOLINGS),
        },
    )


@dataclass
class RelationDataArguments(hvpnet_examples.DataArguments):
    dataset: str = hvpnet_examples.dataset_field(["mnre", "sample"])
    rel2id_file: str | None = field(default=None, metadata={"help": "JSON {relation: id} fixing the relation ids."})


def parse_arguments(
    argv: list[str],
) -> tuple[RelationModelArguments, RelationDataArguments, hvpnet_examples.ExampleTrainingArguments]:
    """Flags, optionally after one JSON or YAML file whose settings they override."""
    return hvpnet_examples.parse_config_and_flags(argv, RelationModelArguments, RelationDataArguments, SCRIPT_DEFAULTS)


def load_raw_datasets(data_args: RelationDataArguments) -> datasets.DatasetDict:
    if data_args.dataset == "sample":
        hvpnet_examples.use_sample_set(data_args, "re")
        data_args.rel2id_file = data_args.rel2id_file or sample_paths("re")["rel2id"]
    return hvpnet_examples.load_splits(load_mre_dataset, data_args, rel2id=data_args.rel2id_file)


def build_compute_metrics(none_id: int, num_labels: int):
    """`compute_metrics`: micro precision, recall and F1 over all relations but `None`."""
    relation_f1 = evaluate.load(metric_path("re_micro_f1"))

    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        predicted = np.argmax(prediction.predictions, axis=-1)
        return relation_f1.compute(
            predictions=predicted, references=prediction.label_ids, none_id=none_id, num_labels=num_labels
        )

    return compute_metrics


def write_predictions(path: Path, raw_split: datasets.Dataset, logits: np.ndarray) -> None:
    """One JSON object per example (see `write_re_predictions`): the pair, gold and predicted relation, probability."""
    names = raw_split.features["relation"].names
    probabilities = torch.softmax(torch.as_tensor(logits, dtype=torch.float32), dim=-1)
    scores, predicted = probabilities.max(dim=-1)
    pairs = zip(predicted.tolist(), scores.tolist(), strict=True)
    best = [[{"relation": names[label], "score": score}] for label, score in pairs]
    gold = [names[relation] for relation in raw_split["relation"]]
    write_re_predictions(path, raw_split, gold, best, top_k=False)


def main(argv: list[str] | None = None) -> dict[str, float]:
    model_args, data_args, training_args = parse_arguments(sys.argv[1:] if argv is None else argv)
    push_to_hub = hvpnet_examples.start_run(training_args)

    raw = load_raw_datasets(data_args)
    hvpnet_examples.limit_and_check_splits(raw, data_args, training_args)

    data_labels = dict(enumerate(raw[next(iter(raw))].features["relation"].names))
    processor, model = hvpnet_examples.load_processor_and_model(
        HVPNetForSequenceClassification, "re", model_args, data_args, data_labels
    )
    hvpnet_examples.check_settings_fit_model(model, data_args)
    raw = hvpnet_examples.labels_of_model(raw, "relation", model)
    label_names = raw[next(iter(raw))].features["relation"].names
    if NO_RELATION not in label_names:
        raise ValueError(f"the relation labels {label_names} lack {NO_RELATION!r}, which the metric leaves out")
    encoded = hvpnet_examples.encode_splits(raw, processor, data_args, training_args, "Tokenizing with entity markers")

    compute_metrics = build_compute_metrics(label_names.index(NO_RELATION), len(label_names))
    trainer = hvpnet_examples.build_trainer(model, processor, encoded, data_args, training_args, compute_metrics)

    results: dict[str, float] = {}
    if training_args.do_train:
        results.update(hvpnet_examples.train_and_save(trainer, encoded["train"]))

    output_dir = Path(training_args.output_dir)
    for split, prefix in hvpnet_examples.evaluated_splits(training_args):
        prediction, metrics = hvpnet_examples.predict_split(trainer, encoded[split], prefix)
        results.update(metrics)
        if trainer.is_world_process_zero():
            write_predictions(output_dir / f"{split}_predictions.jsonl", raw[split], prediction.predictions)

    hvpnet_examples.save_model_card_and_push(
        trainer, "re", results, data_args.dataset, model_args.text_model_name_or_path, push_to_hub
    )
    return results


if __name__ == "__main__":
    main()
