#!/usr/bin/env python
"""
Fine-tunes HVPNeT for multimodal named entity recognition (Twitter-2015, Twitter-2017, or the bundled sample set)
with `Trainer`.

    python examples/run_mner.py examples/configs/twitter2015.yaml
    python examples/run_mner.py examples/configs/twitter2015.yaml --learning_rate 1e-5 --output_dir outputs/t15
    accelerate launch examples/run_mner.py examples/configs/twitter2017.yaml

A single `.json` / `.yaml` file gives the settings; command-line flags after it override them. The checkpoint is
selected on validation F1 only; test is evaluated once, at the end. The output folder receives the model, the
processor, the model card (`README.md`), `all_results.json` and `{validation,test}_predictions.txt` (CoNLL columns:
word, gold tag, predicted tag).
"""

import dataclasses
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import evaluate
import torch
import transformers
import yaml
from transformers import EvalPrediction, HfArgumentParser, Trainer, TrainingArguments, set_seed

import hvpnet_hf
from hvpnet_hf import HVPNetForTokenClassification
from hvpnet_hf.collating import HVPNetDataCollator, sample_subset, tokenize_and_align
from hvpnet_hf.loading import load_mner_dataset
from hvpnet_hf.metrics import align_word_predictions, metric_path
from hvpnet_hf.model_card import push_output_dir_to_hub, render_model_card, training_hyperparameters
from hvpnet_hf.processing_hvpnet import HVPNetProcessor

logger = logging.getLogger(__name__)

SAMPLE_DIR = Path(hvpnet_hf.__file__).parent / "sample_data" / "twitter"
SAMPLE_NOTE = "Trained on the small synthetic sample set bundled with hvpnet_hf: a demonstration, not a usable model."
# Folder names of the splits in the image and crop releases, and in the names of the crop maps (`*_val_dict.pth`).
SPLIT_FOLDERS = {"train": ("train",), "validation": ("val", "dev", "valid"), "test": ("test",)}
# Settings of this script that differ from `TrainingArguments`' defaults (a config file or flag overrides them).
SCRIPT_DEFAULTS = {
    "do_train": True,
    "do_eval": True,
    "do_predict": True,
    "eval_strategy": "epoch",
    "save_strategy": "epoch",
    "logging_strategy": "epoch",
    "load_best_model_at_end": True,
    "metric_for_best_model": "f1",
    "greater_is_better": True,
    "save_total_limit": 2,
    "per_device_train_batch_size": 8,
    "learning_rate": 3e-5,
    "num_train_epochs": 30,
    "warmup_steps": 0.1,
    "weight_decay": 0.01,
    # Without an accelerator, torchrun / accelerate launch processes only form a (gloo) group under use_cpu.
    "use_cpu": not torch.accelerator.is_available(),
}


@dataclass
class ModelArguments:
    text_model_name_or_path: str = field(
        default="bert-base-uncased", metadata={"help": "Pretrained BERT-architecture text encoder (name or path)."}
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A trained HVPNeT NER folder to start from instead (e.g. to evaluate it only)."},
    )
    vision_backbone: str = field(default="resnet50", metadata={"help": "timm backbone with features_only support."})
    vision_pretrained: bool = field(
        default=False, metadata={"help": "Start the backbone from timm's pretrained weights (the paper's setting)."}
    )
    vision_checkpoint: str | None = field(
        default=None, metadata={"help": "Local file with backbone weights (instead of downloading them)."}
    )
    prefix_mode: str = field(default="pyramid", metadata={"choices": ["pyramid", "flat", "one_to_three", "original"]})
    use_visual_prefix: bool = field(default=True, metadata={"help": "False trains a plain BERT-CRF."})
    use_global_image: bool = field(default=True, metadata={"help": "False is the paper's OnlyObj ablation."})
    num_object_images: int = field(default=3, metadata={"help": "Object crops per example (m in the paper)."})
    prefix_grid: int = field(default=2, metadata={"help": "Each feature map is pooled to grid x grid tokens."})
    vision_out_indices: list[int] = field(
        default_factory=lambda: [-4, -3, -2, -1], metadata={"help": "Backbone feature levels of the pyramid."}
    )
    freeze_vision: bool = field(default=True, metadata={"help": "Keep the backbone (and its BatchNorm) fixed."})
    classifier_dropout: float | None = field(default=None)


@dataclass
class DataArguments:
    dataset: str = field(
        default="twitter2015",
        metadata={
            "help": "Name of the data set (for the model card); 'sample' uses the bundled sample set.",
            "choices": ["twitter2015", "twitter2017", "sample"],
        },
    )
    data_dir: str | None = field(default=None, metadata={"help": "Folder with train.txt, valid.txt, test.txt."})
    train_file: str | None = field(default=None)
    validation_file: str | None = field(default=None)
    test_file: str | None = field(default=None)
    image_dir: str | None = field(default=None, metadata={"help": "Folder of the tweet images (<IMGID>.jpg)."})
    object_dir: str | None = field(
        default=None, metadata={"help": "Folder of the object crops, either flat or as {train,val,test}/crops/."}
    )
    object_map_dir: str | None = field(
        default=None,
        metadata={"help": "Folder with the crop maps *_{train,val,test}_dict.pth (default: data_dir)."},
    )
    mask_images: bool = field(
        default=False, metadata={"help": "Mask every image: the same model, trained and evaluated on text only."}
    )
    missing_images: str = field(default="mask", metadata={"choices": ["mask", "error"]})
    sample_ratio: float = field(default=1.0, metadata={"help": "Train on this random share of the training set."})
    max_seq_length: int = field(default=128, metadata={"help": "Longer sentences are cut (cut words count as O)."})
    image_size: int | None = field(default=None, metadata={"help": "Image side (default: the backbone's)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first N validation examples."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Keep the first N test examples."})


def parse_arguments(argv: list[str]) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """Flags, optionally after one JSON or YAML file whose settings they override."""
    dataclass_types = (ModelArguments, DataArguments, TrainingArguments)
    parser = HfArgumentParser(dataclass_types)
    parser.set_defaults(**SCRIPT_DEFAULTS)
    if argv and argv[0].endswith((".json", ".yaml", ".yml")):
        with open(argv[0], encoding="utf-8") as file:
            settings = yaml.safe_load(file) or {}  # YAML also reads JSON
        known = {item.name for cls in dataclass_types for item in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ValueError(f"{argv[0]}: unknown settings {unknown}")
        parser.set_defaults(**settings)
        argv = argv[1:]
    return parser.parse_args_into_dataclasses(args=argv)


def per_split_folders(folder: str | None) -> str | dict[str, str] | None:
    """`folder`, or `{split: folder/<split>[/crops]}` when it is laid out per split as the published releases are."""
    if folder is None:
        return None
    per_split = {}
    for split, names in SPLIT_FOLDERS.items():
        for name in names:
            candidate = Path(folder) / name
            candidate = candidate / "crops" if (candidate / "crops").is_dir() else candidate
            if candidate.is_dir():
                per_split[split] = str(candidate)
                break
    return per_split or folder


def find_object_maps(folder: str) -> dict[str, str]:
    """The crop maps `*_{train,val,test}_dict.pth` (also `dev`) in `folder`, per split."""
    maps = {}
    for split, names in SPLIT_FOLDERS.items():
        for name in names:
            found = sorted(Path(folder).glob(f"*_{name}_dict.pth"))
            if found:
                maps[split] = str(found[0])
                break
    if not maps:
        raise FileNotFoundError(f"no crop map *_{{train,val,test}}_dict.pth in {folder}; set object_map_dir")
    return maps


def load_raw_datasets(data_args: DataArguments) -> datasets.DatasetDict:
    if data_args.dataset == "sample":
        data_args.data_dir = data_args.data_dir or str(SAMPLE_DIR)
        data_args.image_dir = data_args.image_dir or str(SAMPLE_DIR / "images")
        data_args.object_dir = data_args.object_dir or str(SAMPLE_DIR / "aux_images")
    files = {"train": data_args.train_file, "validation": data_args.validation_file, "test": data_args.test_file}
    files = {split: path for split, path in files.items() if path is not None}
    image_dir, object_dir = data_args.image_dir, data_args.object_dir
    if data_args.mask_images:
        image_dir = object_dir = None
    object_maps = None
    if object_dir is not None:
        if data_args.object_map_dir is None and data_args.data_dir is None:
            raise ValueError("object_dir needs object_map_dir (or data_dir), the folder of the *_dict.pth crop maps")
        object_maps = find_object_maps(data_args.object_map_dir or data_args.data_dir)
    return load_mner_dataset(
        data_dir=data_args.data_dir,
        data_files=files or None,
        image_dir=per_split_folders(image_dir),
        object_dir=per_split_folders(object_dir),
        object_maps=object_maps,
        missing_images=data_args.missing_images,
    )


def build_compute_metrics(gold_tags: list[list[str]], id2label: dict[int, str]):
    """`compute_metrics` for one split: word-level entity scores against the split's full gold tag lists."""
    seqeval = evaluate.load(metric_path("ner_seqeval"))

    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        predictions, references, num_truncated = align_word_predictions(
            prediction.predictions, prediction.label_ids, gold_tags, id2label
        )
        return {**seqeval.compute(predictions=predictions, references=references), "truncated_words": num_truncated}

    return compute_metrics


def keep_predicted_tags(outputs: tuple, labels: torch.Tensor) -> torch.Tensor:
    """Of the model's eval outputs `(emissions, predicted_tags, ...)`, keep only the (B, T) Viterbi tags."""
    return outputs[1]


def write_predictions(path: Path, raw_split: datasets.Dataset, predictions: list[list[str]]) -> None:
    """CoNLL columns `word gold predicted`, one word per line, a blank line after each sentence."""
    names = raw_split.features["ner_tags"].feature.names
    with open(path, "w", encoding="utf-8") as file:
        for tokens, gold, predicted in zip(raw_split["tokens"], raw_split["ner_tags"], predictions, strict=True):
            for word, gold_tag, predicted_tag in zip(tokens, gold, predicted, strict=True):
                file.write(f"{word} {names[gold_tag]} {predicted_tag}\n")
            file.write("\n")


def main(argv: list[str] | None = None) -> dict[str, float]:
    model_args, data_args, training_args = parse_arguments(sys.argv[1:] if argv is None else argv)
    # Image and crop paths must reach the collator, which decodes them batch by batch.
    training_args.remove_unused_columns = False
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False  # published once, at the end

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
    set_seed(training_args.seed)

    raw = load_raw_datasets(data_args)
    label_names = raw["train" if "train" in raw else next(iter(raw))].features["ner_tags"].feature.names
    id2label = dict(enumerate(label_names))
    if training_args.do_train and "train" in raw:
        raw["train"] = sample_subset(raw["train"], data_args.sample_ratio, seed=training_args.seed)
    for split, limit in (
        ("train", data_args.max_train_samples),
        ("validation", data_args.max_eval_samples),
        ("test", data_args.max_predict_samples),
    ):
        if limit is not None and split in raw:
            raw[split] = raw[split].select(range(min(limit, len(raw[split]))))
    for split, needed in (
        ("train", training_args.do_train),
        ("validation", training_args.do_train or training_args.do_eval),
        ("test", training_args.do_predict),
    ):
        if needed and split not in raw:
            raise ValueError(
                f"the {split} split is needed but was not found; give it with --data_dir or --{split}_file"
            )

    if model_args.model_name_or_path is not None:
        processor = HVPNetProcessor.from_pretrained(model_args.model_name_or_path)
        model = HVPNetForTokenClassification.from_pretrained(model_args.model_name_or_path)
    else:
        processor = HVPNetProcessor.from_backbone(
            model_args.text_model_name_or_path,
            vision_backbone=model_args.vision_backbone,
            task="ner",
            image_size=data_args.image_size,
            num_object_images=model_args.num_object_images,
            max_length=data_args.max_seq_length,
        )
        model = HVPNetForTokenClassification.from_text_vision_pretrained(
            model_args.text_model_name_or_path,
            vision_backbone=model_args.vision_backbone,
            vision_pretrained=model_args.vision_checkpoint or model_args.vision_pretrained,
            tokenizer=processor.tokenizer,
            num_labels=len(label_names),
            id2label=id2label,
            label2id={label: index for index, label in id2label.items()},
            prefix_mode=model_args.prefix_mode,
            use_visual_prefix=model_args.use_visual_prefix,
            use_global_image=model_args.use_global_image,
            num_object_images=model_args.num_object_images,
            prefix_grid=model_args.prefix_grid,
            vision_out_indices=model_args.vision_out_indices,
            freeze_vision=model_args.freeze_vision,
            classifier_dropout=model_args.classifier_dropout,
        )

    with training_args.main_process_first(desc="tokenizing"):
        encoded = raw.map(
            tokenize_and_align,
            batched=True,
            fn_kwargs={"processor": processor, "max_length": data_args.max_seq_length},
            desc="Tokenizing and aligning labels",
        )
    gold_tags = {split: [[id2label[tag] for tag in tags] for tags in raw[split]["ner_tags"]] for split in raw}

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=encoded["train"] if training_args.do_train else None,
        eval_dataset=encoded.get("validation"),
        processing_class=processor,
        data_collator=HVPNetDataCollator(processor, missing_images=data_args.missing_images),
        compute_metrics=build_compute_metrics(gold_tags["validation"], id2label),
        preprocess_logits_for_metrics=keep_predicted_tags,
    )

    results: dict[str, float] = {}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()  # the best checkpoint on validation F1, with its processor
        metrics = {**train_result.metrics, "train_samples": len(encoded["train"])}
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        results.update(metrics)

    output_dir = Path(training_args.output_dir)
    for split, prefix, wanted in (
        ("validation", "eval", training_args.do_eval),
        ("test", "test", training_args.do_predict),
    ):
        if not wanted:
            continue
        trainer.compute_metrics = build_compute_metrics(gold_tags[split], id2label)
        prediction = trainer.predict(encoded[split], metric_key_prefix=prefix)
        metrics = {**prediction.metrics, f"{prefix}_samples": len(encoded[split])}
        trainer.log_metrics(prefix, metrics)
        trainer.save_metrics(prefix, metrics)
        results.update(metrics)
        if trainer.is_world_process_zero():
            predictions, _, _ = align_word_predictions(
                prediction.predictions, prediction.label_ids, gold_tags[split], id2label
            )
            write_predictions(output_dir / f"{split}_predictions.txt", raw[split], predictions)

    if trainer.is_world_process_zero() and "eval_f1" in results:
        os.makedirs(output_dir, exist_ok=True)
        card = render_model_card(
            "ner",
            trainer.model.config,
            results,
            data_args.dataset,
            model_args.text_model_name_or_path,
            training_hyperparameters(training_args),
            training_args.hub_model_id or str(output_dir),
            note=SAMPLE_NOTE if data_args.dataset == "sample" else None,
        )
        card.save(output_dir / "README.md")
        if push_to_hub:
            trainer.save_model()  # the model, its remote code and the processor, also when nothing was trained
            push_output_dir_to_hub(
                output_dir,
                training_args.hub_model_id or output_dir.name,
                token=training_args.hub_token,
                private=training_args.hub_private_repo,
            )
        logger.info("results: %s", json.dumps({k: v for k, v in results.items() if k.endswith("_f1")}))
    return results


if __name__ == "__main__":
    main()
