#!/usr/bin/env python
"""
Fine-tunes HVPNeT for multimodal named entity recognition (Twitter-2015, Twitter-2017, or the bundled sample set)
with `Trainer`.

    python examples/run_mner.py examples/configs/twitter2015.yaml
    python examples/run_mner.py examples/configs/twitter2015.yaml --learning_rate 1e-5 --output_dir outputs/t15
    python examples/run_mner.py examples/configs/twitter2015.yaml --config_overrides "prefix_mode=flat,prefix_grid=3"
    accelerate launch examples/run_mner.py examples/configs/twitter2017.yaml

A single `.json` / `.yaml` file gives the settings; command-line flags after it override them. The checkpoint is
selected on validation F1 only; test is evaluated once, at the end. The output folder receives the model, the
processor, the model card (`README.md`), `all_results.json` and `{validation,test}_predictions.txt` (CoNLL columns:
word, gold tag, predicted tag).
"""

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import evaluate
import torch
import transformers
from transformers import EvalPrediction, HfArgumentParser, set_seed

from hvpnet_hf import HVPNetConfig, HVPNetForTokenClassification, HVPNetProcessor
from hvpnet_hf.collating import HVPNetDataCollator, tokenize_and_align
from hvpnet_hf.feature_cache import build_feature_cache
from hvpnet_hf.loading import (
    check_images_found_in_splits,
    find_release_layout,
    labels_on_model_ids,
    load_mner_dataset,
)
from hvpnet_hf.metrics import align_word_predictions, metric_path
from hvpnet_hf.model_card import SPLIT_PREFIXES, save_model_card_and_push
from hvpnet_hf.prediction_files import write_ner_predictions
from hvpnet_hf.script_utils import (
    DataTrainingArguments,
    ModelArguments,
    check_max_seq_length,
    check_trained_model_settings,
    parse_settings_and_flags,
    prepare_output_dir,
    select_splits,
    use_sample_set,
)
from hvpnet_hf.training import HVPNetTrainer, HVPNetTrainingArguments, keep_freed_memory

logger = logging.getLogger(__name__)

# Settings that differ from `TrainingArguments`' defaults (a config file or flag overrides them).
SCRIPT_DEFAULTS = {
    "do_train": True,
    "do_eval": True,
    "do_predict": True,
    "eval_strategy": "epoch",
    "save_strategy": "epoch",
    "logging_strategy": "epoch",
    "load_best_model_at_end": True,
    "metric_for_best_model": "f1",
    "save_total_limit": 2,
    "per_device_train_batch_size": 8,
    "learning_rate": 3e-5,
    # The CRF and emission layer at 5e-2, as in the authors' released trainer: at the body's 3e-5 the CRF barely moves
    # in a short run (docs/training.md, "Training recipe").
    "head_learning_rate": 5e-2,
    "num_train_epochs": 30,
    "warmup_steps": 0.1,
    "weight_decay": 0.01,
    # Without an accelerator, torchrun / accelerate launch processes only form a (gloo) group under use_cpu.
    "use_cpu": not torch.accelerator.is_available(),
}


@dataclass
class NerDataArguments(DataTrainingArguments):
    dataset: str = field(
        default="twitter2015",
        metadata={
            "help": "Name of the data set, written in the model card (known: twitter2015, twitter2017, sample; any "
            "name of your own works). 'sample' without data_dir or data files uses the bundled sample set."
        },
    )


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
    # Image and crop paths must reach the collator, which decodes them batch by batch.
    training_args.remove_unused_columns = False
    # The output folder is published once, at the end, with its model card, not by `Trainer` at every save.
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False

    # Setup logging
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logger.info(f"Training/evaluation parameters {training_args}")
    if training_args.do_train and keep_freed_memory():
        logger.info("glibc's malloc keeps the memory the run frees for reuse (hvpnet_hf.training.keep_freed_memory)")

    # A reused output folder: refused, replaced (--overwrite_output_dir) or continued (--resume_from_checkpoint).
    prepare_output_dir(training_args, data_args.overwrite_output_dir)
    set_seed(training_args.seed)

    # Load the splits, with their images, crops and crop maps found in the release's layout.
    if data_args.dataset == "sample":
        use_sample_set(data_args, "ner")
    image_dir, object_dir = (None, None) if data_args.mask_images else (data_args.image_dir, data_args.object_dir)
    layout = find_release_layout(image_dir, object_dir, data_args.object_map_dir or data_args.data_dir)
    raw_datasets = load_mner_dataset(
        data_dir=data_args.data_dir,
        data_files=data_args.data_files,
        missing_images=data_args.missing_images,
        **layout,
    )
    if image_dir is not None:
        check_images_found_in_splits(
            raw_datasets, layout["image_dir"], "image_dir", "pass --mask_images true to use the text only"
        )
    select_splits(raw_datasets, data_args, training_args)

    # Load the processor and the model: a trained folder, or a new model with the data's labels.
    if model_args.model_name_or_path is not None:
        processor = HVPNetProcessor.from_pretrained(model_args.model_name_or_path)
        model = HVPNetForTokenClassification.from_pretrained(model_args.model_name_or_path)
        check_trained_model_settings(
            model, processor, model_args.config_settings, model_args.vision_backbone, data_args.image_size
        )
    else:
        new_config = HVPNetConfig(**model_args.config_settings)  # the settings the processor shares with the model
        vision_backbone = model_args.vision_backbone or new_config.vision_backbone
        processor = HVPNetProcessor.from_backbone(
            model_args.text_model_name_or_path,
            vision_backbone=vision_backbone,
            task="ner",
            image_size=data_args.image_size,
            num_object_images=new_config.num_object_images,
            max_length=data_args.max_seq_length,
        )
        label_names = raw_datasets[next(iter(raw_datasets))].features["ner_tags"].feature.names  # every split's
        model = HVPNetForTokenClassification.from_text_vision_pretrained(
            model_args.text_model_name_or_path,
            vision_backbone=vision_backbone,
            vision_pretrained=model_args.vision_checkpoint or model_args.vision_pretrained,
            processor=processor,
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={label: index for index, label in enumerate(label_names)},
            **model_args.config_settings,
        )
    check_max_seq_length(model, data_args.max_seq_length)
    id2label = model.config.id2label
    raw_datasets = datasets.DatasetDict(
        {
            split: labels_on_model_ids(dataset, "ner_tags", id2label, model.name_or_path)
            for split, dataset in raw_datasets.items()
        }
    )

    # Tokenize (once, on the main process first); images stay paths for the collator to decode.
    with training_args.main_process_first(desc="tokenizing"):
        encoded_datasets = raw_datasets.map(
            tokenize_and_align,
            batched=True,
            fn_kwargs={"processor": processor, "max_length": data_args.max_seq_length},
            desc="Tokenizing and aligning labels",
        )
    gold_tags = {
        split: [[id2label[tag] for tag in tags] for tags in dataset["ner_tags"]]
        for split, dataset in raw_datasets.items()
    }

    feature_cache = None
    if data_args.feature_cache:
        feature_cache = build_feature_cache(
            model, processor, encoded_datasets.values(), data_args.feature_cache_dir, data_args.missing_images
        )
    trainer = HVPNetTrainer(
        model=model,
        args=training_args,
        train_dataset=encoded_datasets["train"] if training_args.do_train else None,
        eval_dataset=encoded_datasets.get("validation"),
        processing_class=processor,
        data_collator=HVPNetDataCollator(
            processor, missing_images=data_args.missing_images, feature_cache=feature_cache
        ),
        # Only validation is scored during training; each split evaluated afterwards gets its own.
        compute_metrics=build_compute_metrics(gold_tags["validation"], id2label) if training_args.do_train else None,
    )

    # Training
    results: dict[str, float] = {}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()  # the best checkpoint on validation F1, its processor, their code and the pipeline's
        metrics = {**train_result.metrics, "train_samples": len(encoded_datasets["train"])}
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        results.update(metrics)

    # Evaluation (validation) and prediction (test), each with its prediction file
    asked = {"validation": training_args.do_eval, "test": training_args.do_predict}
    for split, prefix in SPLIT_PREFIXES.items():
        if not asked[split]:
            continue
        trainer.compute_metrics = build_compute_metrics(gold_tags[split], id2label)
        prediction = trainer.predict(encoded_datasets[split], metric_key_prefix=prefix)
        metrics = {**prediction.metrics, f"{prefix}_samples": len(encoded_datasets[split])}
        trainer.log_metrics(prefix, metrics)
        trainer.save_metrics(prefix, metrics)
        results.update(metrics)
        if trainer.is_world_process_zero():
            predictions, _, _ = align_word_predictions(
                prediction.predictions, prediction.label_ids, gold_tags[split], id2label
            )
            sentences = zip(raw_datasets[split]["tokens"], gold_tags[split], predictions, strict=True)
            write_ner_predictions(Path(training_args.output_dir) / f"{split}_predictions.txt", sentences)

    save_model_card_and_push(
        trainer, "ner", results, data_args.dataset, model_args.text_model_name_or_path, push_to_hub
    )
    return results


if __name__ == "__main__":
    main()
