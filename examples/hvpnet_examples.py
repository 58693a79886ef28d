"""
What `run_mner.py` and `run_mre.py` share: the model and data flags, the config-file parsing, the model, the
`Trainer`, and the model card. Each script keeps its own data set, metric and prediction file; the data sets' layout
(image and crop folders, crop maps) is found by `hvpnet_hf.loading`.
"""

import dataclasses
import inspect
import json
import logging
import os
import shutil
import sys
import typing
from argparse import ArgumentError
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
import yaml
from huggingface_hub import constants
from transformers import EvalPrediction, HfArgumentParser, PreTrainedModel, Trainer, TrainingArguments, set_seed
from transformers.trainer_utils import PredictionOutput

from hvpnet_hf.collating import HVPNetDataCollator, sample_subset, tokenize_and_align
from hvpnet_hf.configuration_hvpnet import PREFIX_MODES, HVPNetConfig
from hvpnet_hf.feature_cache import VisualFeatureCache
from hvpnet_hf.file_utils import check_output_dir
from hvpnet_hf.loading import check_images_found, find_release_layout, labels_on_model_ids, split_folders
from hvpnet_hf.model_card import SPLIT_PREFIXES, push_output_dir_to_hub, render_model_card, training_hyperparameters
from hvpnet_hf.processing_hvpnet import HVPNetProcessor
from hvpnet_hf.sample_data import sample_paths
from hvpnet_hf.training import HVPNetTrainer, HVPNetTrainingArguments, keep_freed_memory

logger = logging.getLogger(__name__)

# The defaults of the model flags that are `HVPNetConfig` fields.
DEFAULT_CONFIG = HVPNetConfig()
SAMPLE_NOTE = "Trained on the small synthetic sample set bundled with hvpnet_hf: a demonstration, not a usable model."
# Settings of both scripts that differ from `TrainingArguments`' defaults (a config file or flag overrides them).
TRAINING_DEFAULTS = {
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
    "warmup_steps": 0.1,
    "weight_decay": 0.01,
    # Without an accelerator, torchrun / accelerate launch processes only form a (gloo) group under use_cpu.
    "use_cpu": not torch.accelerator.is_available(),
}


@dataclass
class ModelArguments:
    """The model flags of both tasks; the relation script adds `relation_pooling`."""

    text_model_name_or_path: str = field(
        default="bert-base-uncased",
        metadata={"help": "Pretrained BERT-family text encoder (name or path): BERT, RoBERTa, XLM-R, ELECTRA, ..."},
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A trained HVPNeT folder of this task to start from instead (e.g. to evaluate it only)."},
    )
    vision_backbone: str = field(
        default=DEFAULT_CONFIG.vision_backbone, metadata={"help": "timm backbone with features_only support."}
    )
    vision_pretrained: bool = field(
        default=False, metadata={"help": "Start the backbone from timm's pretrained weights (the paper's setting)."}
    )
    vision_checkpoint: str | None = field(
        default=None, metadata={"help": "Local file with backbone weights (instead of downloading them)."}
    )
    # The flags from here on are `HVPNetConfig` fields of the same name, with its defaults (see `config_flags`).
    prefix_mode: str = field(default=DEFAULT_CONFIG.prefix_mode, metadata={"choices": list(PREFIX_MODES)})
    use_visual_prefix: bool = field(
        default=DEFAULT_CONFIG.use_visual_prefix,
        metadata={"help": "False trains plain BERT (a BERT-CRF for NER, a BERT relation classifier)."},
    )
    use_global_image: bool = field(
        default=DEFAULT_CONFIG.use_global_image, metadata={"help": "False is the paper's OnlyObj ablation."}
    )
    num_object_images: int = field(
        default=DEFAULT_CONFIG.num_object_images, metadata={"help": "Object crops per example (m in the paper)."}
    )
    prefix_grid: int = field(
        default=DEFAULT_CONFIG.prefix_grid, metadata={"help": "Each feature map is pooled to grid x grid tokens."}
    )
    vision_out_indices: list[int] | None = field(
        default=DEFAULT_CONFIG.vision_out_indices,
        metadata={"help": "Backbone feature levels of the pyramid (default: chosen from the backbone)."},
    )
    freeze_vision: bool = field(
        default=DEFAULT_CONFIG.freeze_vision, metadata={"help": "Keep the backbone (and its BatchNorm) fixed."}
    )
    vision_chunk_size: int | None = field(
        default=DEFAULT_CONFIG.vision_chunk_size,
        metadata={
            "help": "Images per backbone call (peak memory follows it); null in a config file: one call per batch."
        },
    )
    vision_model_args: str | None = field(
        default=None,
        metadata={
            "help": "Extra keyword arguments of timm.create_model for the backbone, as JSON (e.g. "
            "'{\"img_size\": 384}'); a mapping in a config file. Read into a dict."
        },
    )
    classifier_dropout: float | None = field(default=DEFAULT_CONFIG.classifier_dropout)

    def __post_init__(self):
        text = self.vision_model_args
        try:
            self.vision_model_args = {} if text is None else json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"vision_model_args must be a JSON mapping, got {text!r}") from error
        if not isinstance(self.vision_model_args, dict):
            raise ValueError(f"vision_model_args must be a JSON mapping, got {text!r}")


def config_flags(model_args: ModelArguments) -> dict[str, Any]:
    """
    The flags that are `HVPNetConfig` fields of the same name, for `from_text_vision_pretrained`; the backbone and
    its weights are arguments of that method itself.
    """
    config_fields = inspect.signature(HVPNetConfig).parameters.keys() - {"vision_backbone", "vision_pretrained"}
    return {
        item.name: getattr(model_args, item.name)
        for item in dataclasses.fields(model_args)
        if item.name in config_fields
    }


def dataset_field(known: list[str]) -> Any:
    """The `dataset` flag of a script: any name (the first of `known` by default), named in the model card."""
    return field(
        default=known[0],
        metadata={
            "help": f"Name of the data set, written in the model card (known: {', '.join(known)}; any name of your own "
            "data set works). 'sample' without data_dir or data files uses the bundled sample set."
        },
    )


@dataclass
class DataArguments:
    """The data flags of both tasks; each script adds its `dataset` (a `dataset_field`)."""

    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder with the splits (Twitter: {train,valid,test}.txt; MNRE: *train*, *val* or *dev*, *test*)."
        },
    )
    train_file: str | None = field(default=None)
    validation_file: str | None = field(default=None)
    test_file: str | None = field(default=None)
    image_dir: str | None = field(
        default=None, metadata={"help": "Folder of the images, flat or as {train,val,test}/ (MNRE: img_org)."}
    )
    object_dir: str | None = field(
        default=None,
        metadata={"help": "Folder of the object crops, flat or as {train,val,test}/crops/ (MNRE: img_vg)."},
    )
    object_map_dir: str | None = field(
        default=None,
        metadata={"help": "Folder with the crop maps *_{train,val,test}_dict.pth, or *_dev_* (default: data_dir)."},
    )
    mask_images: bool = field(
        default=False, metadata={"help": "Mask every image: the same model, trained and evaluated on text only."}
    )
    missing_images: str = field(default="mask", metadata={"choices": ["mask", "error"]})
    sample_ratio: float = field(default=1.0, metadata={"help": "Train on this random share of the training set."})
    max_seq_length: int = field(
        default=128,
        metadata={"help": "Longer inputs are cut (NER: cut words count as O; MNRE: the tokens nearest <s>/<o> stay)."},
    )
    image_size: int | None = field(default=None, metadata={"help": "Image side (default: the backbone's)."})
    feature_cache: bool = field(
        default=True,
        metadata={
            "help": "Read the frozen backbone's image features from a disk cache built on first use instead of "
            "decoding and encoding every image in every epoch (off when the backbone is trained)."
        },
    )
    feature_cache_dir: str | None = field(
        default=None, metadata={"help": "Folder of the feature caches (default: $HF_HOME/hvpnet_hf/visual_features)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first N validation examples."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Keep the first N test examples."})

    def __post_init__(self):
        _check_range(self, "max_seq_length", 1)
        _check_range(self, "image_size", 1)
        for name in ("max_train_samples", "max_eval_samples", "max_predict_samples"):
            _check_range(self, name, 1)
        if not 0.0 < self.sample_ratio <= 1.0:
            raise ValueError(f"sample_ratio must be in (0, 1], got {self.sample_ratio}")


@dataclass
class ExampleTrainingArguments(HVPNetTrainingArguments):
    """`HVPNetTrainingArguments` plus the rule for a reused output folder (see `prepare_output_dir`)."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Train into a non-empty output_dir: its checkpoints, results and predictions are deleted first "
            "(without this flag or --resume_from_checkpoint, a non-empty output_dir is refused)."
        },
    )


def parse_config_and_flags(
    argv: list[str], model_arguments: type, data_arguments: type, defaults: dict[str, Any]
) -> tuple[Any, Any, ExampleTrainingArguments]:
    """
    Flags, optionally after one JSON or YAML file whose settings they override; `defaults` come first. The file's
    settings become flags before the command-line ones, so the flags' types and choices check them. Without
    training, evaluation strategies are switched off: they would only turn `do_eval` back on (`TrainingArguments`
    does so) and ask for a validation split.
    """
    dataclass_types = (model_arguments, data_arguments, ExampleTrainingArguments)
    parser = HfArgumentParser(dataclass_types)
    parser.set_defaults(**defaults)
    if argv and argv[0].endswith((".json", ".yaml", ".yml")):
        with open(argv[0], encoding="utf-8") as file:
            settings = yaml.safe_load(file) or {}  # YAML also reads JSON
        argv = [*settings_as_flags(argv[0], settings, parser, dataclass_types), *argv[1:]]
    arguments = parser.parse_args_into_dataclasses(args=argv)
    if not arguments[-1].do_train:
        parser.set_defaults(eval_strategy="no", load_best_model_at_end=False)
        arguments = parser.parse_args_into_dataclasses(args=argv)
    _check_training_ranges(arguments[-1])
    return arguments


def settings_as_flags(
    config_file: str, settings: Any, parser: HfArgumentParser, dataclass_types: tuple[type, ...]
) -> list[str]:
    """
    The settings of a config file as command-line flags, each one read by `parser` on its own first, so that a value
    its flag refuses (type, choices) is an error naming the file and the setting. A null setting, which no flag can
    give, becomes the default of its flag, and only of a flag that may be None.
    """
    if not isinstance(settings, dict):
        raise ValueError(f"{config_file}: expected a mapping of settings, got {type(settings).__name__}")
    hints = {}
    for cls in dataclass_types:
        names = {item.name for item in dataclasses.fields(cls) if item.init}
        hints.update({name: hint for name, hint in typing.get_type_hints(cls).items() if name in names})
    unknown = sorted(set(settings) - set(hints))
    if unknown:
        raise ValueError(f"{config_file}: unknown settings {unknown}")
    flags = []
    for name, value in settings.items():
        if value is None:
            if type(None) not in typing.get_args(hints[name]):
                raise ValueError(f"{config_file}: setting {name!r} cannot be null")
            parser.set_defaults(**{name: None})
            continue
        values = value if isinstance(value, list) else [value]
        flag = [f"--{name}", *(_flag_value(item) for item in values)]
        parser.exit_on_error = False  # raise argparse's error instead of exiting, to name the file
        try:
            _, left_over = parser.parse_known_args(flag)
        except ArgumentError as error:
            raise ValueError(f"{config_file}: setting {name!r}: {error}") from None
        finally:
            parser.exit_on_error = True
        if left_over:
            raise ValueError(f"{config_file}: setting {name!r} takes one value, got {value!r}")
        flags += flag
    return flags


def _flag_value(value: Any) -> str:
    """A setting's value as the command line writes it: true/false for booleans, JSON for a mapping."""
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value) if isinstance(value, dict) else str(value)


def _check_range(arguments: Any, name: str, minimum: int) -> None:
    value = getattr(arguments, name)
    if value is not None and value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")


def _check_training_ranges(training_args: TrainingArguments) -> None:
    _check_range(training_args, "per_device_train_batch_size", 1)
    _check_range(training_args, "per_device_eval_batch_size", 1)
    _check_range(training_args, "gradient_accumulation_steps", 1)
    _check_range(training_args, "learning_rate", 0)
    if training_args.do_train and training_args.num_train_epochs <= 0 and training_args.max_steps <= 0:
        raise ValueError(f"num_train_epochs must be above 0 to train, got {training_args.num_train_epochs}")


# What a run writes into its output folder besides the model files, which are rewritten anyway.
RUN_OUTPUTS = ("checkpoint-*", "*_results.json", "*_predictions.txt", "*_predictions.jsonl", "trainer_state.json")


def prepare_output_dir(training_args: ExampleTrainingArguments) -> None:
    """
    The rule of the transformers example scripts for a reused output folder: training into a non-empty one is
    refused, unless resuming (`resume_from_checkpoint`) or overwriting (`overwrite_output_dir`), which deletes the
    earlier run's checkpoints, results and predictions first so that nothing of it is mixed into the new run.
    """
    output_dir = Path(training_args.output_dir)
    check_output_dir(output_dir, "output_dir")
    if not training_args.do_train or training_args.resume_from_checkpoint or not output_dir.is_dir():
        return
    if not any(output_dir.iterdir()):
        return
    if not training_args.overwrite_output_dir:
        raise ValueError(
            f"output_dir {output_dir} is not empty: pass --overwrite_output_dir true to replace the run in it, "
            "--resume_from_checkpoint to continue it, or choose another output_dir"
        )
    if training_args.process_index == 0:
        for pattern in RUN_OUTPUTS:
            for path in output_dir.glob(pattern):
                shutil.rmtree(path) if path.is_dir() else path.unlink()


def start_run(training_args: ExampleTrainingArguments) -> bool:
    """
    Readies `training_args` for the HVPNeT collator, sets up logging and the seed, lets a training run's C allocator
    keep freed memory (`keep_freed_memory`), and clears or refuses a reused output folder (see
    `prepare_output_dir`). Returns whether to publish the output folder at the end (once, with its model card), which
    `Trainer` itself then does not do.
    """
    # Image and crop paths must reach the collator, which decodes them batch by batch.
    training_args.remove_unused_columns = False
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False
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
    if training_args.do_train and keep_freed_memory():
        logger.info("glibc's malloc keeps the memory the run frees for reuse (hvpnet_hf.training.keep_freed_memory)")
    prepare_output_dir(training_args)
    return push_to_hub


def use_sample_set(data_args: DataArguments, task: str) -> None:
    """
    Points the data flags at the bundled sample set of `task` (its image and crop folders unless given). Refuses
    data of the user's own alongside: the run would be named (and its model card written) as the sample set, and
    the sample's image folders must never be used for other data.
    """
    flags = ("data_dir", "train_file", "validation_file", "test_file")
    given = [f"--{flag}" for flag in flags if getattr(data_args, flag) is not None]
    if given:
        raise ValueError(
            f"dataset is 'sample' (the bundled sample set), but {', '.join(given)} name data of your own: pass "
            "--dataset with the name of your data set (it is written in the model card)"
        )
    sample = sample_paths(task)
    data_args.data_dir = sample["data_dir"]
    data_args.image_dir = data_args.image_dir or sample["image_dir"]
    data_args.object_dir = data_args.object_dir or sample["object_dir"]


def load_splits(
    loader: Callable[..., datasets.DatasetDict], data_args: DataArguments, **task_arguments: Any
) -> datasets.DatasetDict:
    """The splits the data flags name, read by `loader` (`load_m{ner,re}_dataset`), with their images found."""
    raw = loader(**dataset_sources(data_args), **task_arguments)
    if not data_args.mask_images and data_args.image_dir is not None:
        folders = split_folders(data_args.image_dir)
        for split, dataset in raw.items():
            folder = folders.get(split, data_args.image_dir) if isinstance(folders, dict) else folders
            text_only = "pass --mask_images true to use the text only"
            check_images_found(dataset, f"the {split} split", folder, "image_dir", text_only)
    return raw


def dataset_sources(data_args: DataArguments) -> dict[str, Any]:
    """The split files, image and crop folders and crop maps, as keyword arguments of `load_m{ner,re}_dataset`."""
    files = {"train": data_args.train_file, "validation": data_args.validation_file, "test": data_args.test_file}
    files = {split: path for split, path in files.items() if path is not None}
    image_dir, object_dir = data_args.image_dir, data_args.object_dir
    if data_args.mask_images:
        image_dir = object_dir = None
    if object_dir is not None and data_args.object_map_dir is None and data_args.data_dir is None:
        raise ValueError("object_dir needs object_map_dir (or data_dir), the folder of the *_dict.pth crop maps")
    return {
        "data_dir": data_args.data_dir,
        "data_files": files or None,
        **find_release_layout(image_dir, object_dir, data_args.object_map_dir or data_args.data_dir),
        "missing_images": data_args.missing_images,
    }


def limit_and_check_splits(
    raw: datasets.DatasetDict, data_args: DataArguments, training_args: TrainingArguments
) -> None:
    """Samples and cuts the splits as the flags ask, and checks that every split the run needs is there."""
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


def load_processor_and_model(
    model_class: type[PreTrainedModel],
    task: str,
    model_args: ModelArguments,
    data_args: DataArguments,
    id2label: dict[int, str],
) -> tuple[HVPNetProcessor, PreTrainedModel]:
    """A trained folder (`model_name_or_path`), or a new model on a pretrained text encoder, with its processor."""
    if model_args.model_name_or_path is not None:
        processor = HVPNetProcessor.from_pretrained(model_args.model_name_or_path)
        model = model_class.from_pretrained(model_args.model_name_or_path)
        check_flags_apply_to_loaded_model(model, processor, model_args, data_args)
        return processor, model
    processor = HVPNetProcessor.from_backbone(
        model_args.text_model_name_or_path,
        vision_backbone=model_args.vision_backbone,
        task=task,
        image_size=data_args.image_size,
        num_object_images=model_args.num_object_images,
        max_length=data_args.max_seq_length,
    )
    model = model_class.from_text_vision_pretrained(
        model_args.text_model_name_or_path,
        vision_backbone=model_args.vision_backbone,
        vision_pretrained=model_args.vision_checkpoint or model_args.vision_pretrained,
        processor=processor,
        num_labels=len(id2label),
        id2label=id2label,
        label2id={label: index for index, label in id2label.items()},
        **config_flags(model_args),
    )
    return processor, model


def check_flags_apply_to_loaded_model(
    model: PreTrainedModel, processor: HVPNetProcessor, model_args: ModelArguments, data_args: DataArguments
) -> None:
    """
    A trained folder brings its own architecture and image processing: refuses a model flag (or `image_size`) that
    was set away from its default to something the loaded model does not have, since it would be ignored.
    """
    defaults = type(model_args)()
    loaded = {**config_flags(model_args), "vision_backbone": model_args.vision_backbone}
    ignored = [
        f"{name}={value!r} (the model has {getattr(model.config, name)!r})"
        for name, value in loaded.items()
        if value != getattr(defaults, name) and value != getattr(model.config, name)
    ]
    image_size = processor.image_processor.image_size
    if data_args.image_size is not None and data_args.image_size != image_size:
        ignored.append(f"image_size={data_args.image_size!r} (its processor has {image_size!r})")
    if ignored:
        raise ValueError(
            f"model_name_or_path {model_args.model_name_or_path} is a trained model, which keeps its own settings; "
            f"these would be ignored: {', '.join(ignored)}. Leave them out (or train a new model)"
        )


def labels_of_model(raw: datasets.DatasetDict, column: str, model: PreTrainedModel) -> datasets.DatasetDict:
    """
    The splits with their `column` labels on the model's ids (see `labels_on_model_ids`): a trained model
    (`model_name_or_path`) keeps its own label names and ids; a new one was built with the data's.
    """
    id2label, name = model.config.id2label, model.name_or_path
    return datasets.DatasetDict(
        {split: labels_on_model_ids(dataset, column, id2label, name) for split, dataset in raw.items()}
    )


def check_settings_fit_model(model: PreTrainedModel, data_args: DataArguments) -> None:
    """Refuses, before any tokenising, a `max_seq_length` beyond the positions of the model's text encoder."""
    limit = model.base_model.max_text_length
    if data_args.max_seq_length > limit:
        raise ValueError(
            f"max_seq_length must be at most {limit}, the tokens the text model of {model.name_or_path} takes, "
            f"got {data_args.max_seq_length}"
        )


def encode_splits(
    raw: datasets.DatasetDict,
    processor: HVPNetProcessor,
    data_args: DataArguments,
    training_args: TrainingArguments,
    description: str,
) -> datasets.DatasetDict:
    """Tokenizes every split (once, on the main process first); images stay paths for the collator to decode."""
    with training_args.main_process_first(desc="tokenizing"):
        return raw.map(
            tokenize_and_align,
            batched=True,
            fn_kwargs={"processor": processor, "max_length": data_args.max_seq_length},
            desc=description,
        )


def build_feature_cache(
    model: PreTrainedModel, processor: HVPNetProcessor, encoded: datasets.DatasetDict, data_args: DataArguments
) -> VisualFeatureCache | None:
    """The backbone features of every image of every split, cached on disk (`--feature_cache`), when the backbone is
    frozen; None otherwise. Under torchrun / accelerate one process builds while the others wait, then all read."""
    config = model.config
    if not (data_args.feature_cache and config.use_visual_prefix and config.freeze_vision):
        return None
    cache_dir = data_args.feature_cache_dir or os.path.join(constants.HF_HOME, "hvpnet_hf", "visual_features")
    cache = VisualFeatureCache(model, processor, cache_dir, missing_images=data_args.missing_images)
    paths = []
    for split in encoded.values():
        paths += split["image"]
        paths += [path for objects in split["objects"] for path in objects]
    cache.build(paths)
    logger.info("visual feature cache %s (%d unreadable images masked)", cache.folder, cache.num_unreadable)
    return cache


def build_trainer(
    model: PreTrainedModel,
    processor: HVPNetProcessor,
    encoded: datasets.DatasetDict,
    data_args: DataArguments,
    training_args: TrainingArguments,
    compute_metrics: Callable[[EvalPrediction], dict[str, float]],
    preprocess_logits_for_metrics: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
) -> Trainer:
    """A `Trainer` (with the head's own learning rate, if set) that hands the examples, image paths included, to
    the HVPNeT collator, which serves cached backbone features when `--feature_cache` applies."""
    collator = HVPNetDataCollator(
        processor,
        missing_images=data_args.missing_images,
        feature_cache=build_feature_cache(model, processor, encoded, data_args),
    )
    return HVPNetTrainer(
        model=model,
        args=training_args,
        train_dataset=encoded["train"] if training_args.do_train else None,
        eval_dataset=encoded.get("validation"),
        processing_class=processor,
        data_collator=collator,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
    )


def train_and_save(trainer: Trainer, train_dataset: datasets.Dataset) -> dict[str, float]:
    """Trains, saves the best checkpoint on validation F1 (with its processor) and the state; the train metrics."""
    train_result = trainer.train(resume_from_checkpoint=trainer.args.resume_from_checkpoint)
    trainer.save_model()  # the model, its processor, their code and the pipeline's
    metrics = {**train_result.metrics, "train_samples": len(train_dataset)}
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    return metrics


def evaluated_splits(training_args: TrainingArguments) -> list[tuple[str, str]]:
    """`(split, metric prefix)` of the splits to evaluate: validation (`eval`) and test (`test`) as asked."""
    asked = {"validation": training_args.do_eval, "test": training_args.do_predict}
    return [(split, prefix) for split, prefix in SPLIT_PREFIXES.items() if asked[split]]


def predict_split(
    trainer: Trainer, dataset: datasets.Dataset, prefix: str
) -> tuple[PredictionOutput, dict[str, float]]:
    """Predicts `dataset`, logs and saves its metrics (with `{prefix}_samples`); the predictions and the metrics."""
    prediction = trainer.predict(dataset, metric_key_prefix=prefix)
    metrics = {**prediction.metrics, f"{prefix}_samples": len(dataset)}
    trainer.log_metrics(prefix, metrics)
    trainer.save_metrics(prefix, metrics)
    return prediction, metrics


def save_model_card_and_push(
    trainer: Trainer,
    task: str,
    results: dict[str, float],
    dataset: str,
    text_model_name_or_path: str,
    push_to_hub: bool,
) -> None:
    """Writes the model card (once validation was scored) and, if asked, publishes the output folder."""
    if not (trainer.is_world_process_zero() and "eval_f1" in results):
        return
    training_args = trainer.args
    output_dir = Path(training_args.output_dir)
    os.makedirs(output_dir, exist_ok=True)
    card = render_model_card(
        task,
        trainer.model.config,
        results,
        dataset,
        text_model_name_or_path,
        training_hyperparameters(training_args),
        training_args.hub_model_id or str(output_dir),
        note=SAMPLE_NOTE if dataset == "sample" else None,
    )
    card.save(output_dir / "README.md")
    if push_to_hub:
        trainer.save_model()  # also when nothing was trained
        push_output_dir_to_hub(
            output_dir,
            training_args.hub_model_id or output_dir.name,
            token=training_args.hub_token,
            private=training_args.hub_private_repo,
        )
    logger.info("results: %s", json.dumps({k: v for k, v in results.items() if k.endswith("_f1")}))
