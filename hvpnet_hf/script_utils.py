"""
What the example training scripts (`examples/run_mner.py`, `examples/run_mre.py`) take from the package: one settings
file read as flags, the model's `--config_overrides`, the rule for a reused output folder, the bundled sample set as
a run's data, the checks that a model can serve the run before any data is tokenized, and the steps of a run that
both scripts take alike (loading the data and the model, tokenizing, training, predicting a split).
"""

import dataclasses
import json
import logging
import shutil
import sys
import typing
from argparse import ArgumentError
from collections.abc import Callable
from dataclasses import dataclass, field
from difflib import get_close_matches
from pathlib import Path
from typing import Any, ClassVar

import datasets
import torch
import transformers
import yaml
from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, HfArgumentParser, PreTrainedModel, TrainingArguments, set_seed
from transformers.trainer_utils import PredictionOutput, get_last_checkpoint

from .collating import HVPNetDataCollator, sample_subset, tokenize_and_align
from .configuration_hvpnet import HVPNetConfig
from .data_sources import (
    COLUMN_FLAGS,
    LABEL_COLUMNS,
    TASK_COLUMNS,
    ImageCounts,
    is_table_file,
    label_names_of,
    load_table_dataset,
    stream_table_dataset,
)
from .feature_cache import build_feature_cache
from .loading import check_images_found_in_splits, find_release_layout, labels_on_model_ids
from .modeling_hvpnet import HVPNetPreTrainedModel
from .output_files import check_output_dir
from .processing_hvpnet import HVPNetProcessor
from .sample_data import sample_paths
from .training import HVPNetTrainer, keep_freed_memory

logger = logging.getLogger(__name__)

# `HVPNetConfig` settings that a script sets from its own flags and the data, never through `--config_overrides`.
SET_BY_THE_SCRIPTS = ("text_config", "vision_backbone", "vision_pretrained", "id2label", "label2id")
# The help of the split file flags: the extension tells a table file from a file in a published format.
SPLIT_FILE_HELP = (
    "A split file: JSON lines (.json, .jsonl), CSV (.csv) or Parquet (.parquet), read as a data set of your own, or "
    "a file in a published format (any other extension)."
)
# How to ask for the text only, said when not one image of a split is found.
TEXT_ONLY = "pass --mask_images true to use the text only"
# What a run writes into its output folder besides the model files, which are rewritten anyway.
RUN_OUTPUTS = ("checkpoint-*", "*_results.json", "*_predictions.txt", "*_predictions.jsonl", "trainer_state.json")


def parse_settings_and_flags(parser: HfArgumentParser, argv: list[str]) -> tuple[Any, ...]:
    """
    The dataclasses of `parser` from flags, optionally after one JSON or YAML file whose settings they override. The
    file's settings become flags before the command-line ones, so that the flags' types and choices check them.
    Without training, evaluation strategies are switched off: they would only turn `do_eval` back on
    (`TrainingArguments` does so) and ask for a validation split.
    """
    if argv and argv[0].endswith((".json", ".yaml", ".yml")):
        with open(argv[0], encoding="utf-8") as file:
            settings = yaml.safe_load(file) or {}  # YAML also reads JSON
        argv = [*settings_as_flags(argv[0], settings, parser), *argv[1:]]
    arguments = parser.parse_args_into_dataclasses(args=argv)
    if not arguments[-1].do_train:
        parser.set_defaults(eval_strategy="no", load_best_model_at_end=False)
        arguments = parser.parse_args_into_dataclasses(args=argv)
    _check_training_ranges(arguments[-1])
    return arguments


def settings_as_flags(config_file: str, settings: Any, parser: HfArgumentParser) -> list[str]:
    """
    The settings of a config file as command-line flags, each one read by `parser` on its own first, so that a value
    its flag refuses (type, choices) is an error naming the file and the setting. A null setting, which no flag can
    give, becomes the default of its flag, and only of a flag that may be None.
    """
    if not isinstance(settings, dict):
        raise ValueError(f"{config_file}: expected a mapping of settings, got {type(settings).__name__}")
    hints = {}
    for cls in parser.dataclass_types:
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


def check_range(arguments: Any, name: str, minimum: int) -> None:
    """Refuses a setting `name` of `arguments` below `minimum` (None passes)."""
    value = getattr(arguments, name)
    if value is not None and value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")


def _check_training_ranges(training_args: TrainingArguments) -> None:
    check_range(training_args, "per_device_train_batch_size", 1)
    check_range(training_args, "per_device_eval_batch_size", 1)
    check_range(training_args, "gradient_accumulation_steps", 1)
    check_range(training_args, "learning_rate", 0)
    if training_args.do_train and training_args.num_train_epochs <= 0 and training_args.max_steps <= 0:
        raise ValueError(f"num_train_epochs must be above 0 to train, got {training_args.num_train_epochs}")


def parse_config_overrides(text: str | None) -> dict[str, Any]:
    """
    `"prefix_grid=3,vision_out_indices=[-2, -1]"` as `{"prefix_grid": 3, "vision_out_indices": [-2, -1]}`: settings
    of `HVPNetConfig` for a new model, each value read as YAML (`true`, `null`, `[1, 2]`, `{img_size: 384}`), and
    checked by building the config they describe. An unknown setting, one a script sets itself, or a value the
    config refuses is an error naming `config_overrides`.
    """
    if not text:
        return {}
    known = set(HVPNetConfig().to_dict()) - set(SET_BY_THE_SCRIPTS)
    settings = {}
    for item in _top_level_items(text):
        name, equals, value = item.partition("=")
        name = name.strip()
        if not equals or not name:
            raise ValueError(f"config_overrides: expected name=value, got {item!r} in {text!r}")
        if name not in known:
            close = get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            own_flag = f"; it has a flag of its own, --{name}" if name in SET_BY_THE_SCRIPTS else ""
            raise ValueError(f"config_overrides: {name!r} is not a setting of HVPNetConfig{hint}{own_flag}")
        settings[name] = yaml.safe_load(value)
    try:
        HVPNetConfig(**settings)
    except (TypeError, ValueError, StrictDataclassError) as error:
        reason = error.__cause__ or error  # a strict dataclass wraps the error of its validator
        raise ValueError(f"config_overrides {text!r}: {reason}") from error
    return settings


def _top_level_items(text: str) -> list[str]:
    """`text` cut at the commas outside brackets and braces."""
    items, depth, start = [], 0, 0
    for position, character in enumerate(text):
        depth += (character in "[{") - (character in "]}")
        if character == "," and depth == 0:
            items.append(text[start:position])
            start = position + 1
    return [*items, text[start:]]


def prepare_output_dir(training_args: TrainingArguments, overwrite_output_dir: bool) -> None:
    """
    The rule for a reused output folder: training into a non-empty one is refused (naming its last checkpoint, if
    any), unless resuming (`resume_from_checkpoint`) or overwriting, which deletes the earlier run's checkpoints,
    results and predictions first so that nothing of it is mixed into the new run. A run is never resumed silently:
    its settings may differ from the earlier run's.
    """
    output_dir = Path(training_args.output_dir)
    check_output_dir(output_dir, "output_dir")
    if not training_args.do_train or training_args.resume_from_checkpoint or not output_dir.is_dir():
        return
    if not any(output_dir.iterdir()):
        return
    if not overwrite_output_dir:
        last_checkpoint = get_last_checkpoint(output_dir)
        resume = f"--resume_from_checkpoint {last_checkpoint}" if last_checkpoint else "--resume_from_checkpoint"
        raise ValueError(
            f"output_dir {output_dir} is not empty: pass --overwrite_output_dir true to replace the run in it, "
            f"{resume} to continue it, or choose another output_dir"
        )
    if training_args.process_index == 0:
        for pattern in RUN_OUTPUTS:
            for path in output_dir.glob(pattern):
                shutil.rmtree(path) if path.is_dir() else path.unlink()


def use_sample_set(data_args: Any, task: str) -> None:
    """
    Points the data flags of `data_args` at the bundled sample set of `task` (its image and crop folders unless
    given). Refuses data of the user's own alongside: the run would be named (and its model card written) as the
    sample set, and the sample's image folders must never be used for other data.
    """
    flags = ("dataset_name", "data_dir", "train_file", "validation_file", "test_file")
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
    if task == "re":
        data_args.rel2id_file = data_args.rel2id_file or sample["rel2id"]


def select_splits(splits: DatasetDict | IterableDatasetDict, data_args: Any, training_args: TrainingArguments) -> None:
    """
    Samples and cuts the splits in place as the data flags of `data_args` ask (`sample_ratio`, `max_*_samples`; a
    stream is cut as it is read), and checks that every split the run needs is there.
    """
    if training_args.do_train and "train" in splits:
        splits["train"] = sample_subset(splits["train"], data_args.sample_ratio, seed=training_args.seed)
    for split, limit in (
        ("train", data_args.max_train_samples),
        ("validation", data_args.max_eval_samples),
        ("test", data_args.max_predict_samples),
    ):
        if limit is not None and isinstance(splits.get(split), IterableDataset):
            splits[split] = splits[split].take(limit)
        elif limit is not None and split in splits:
            splits[split] = splits[split].select(range(min(limit, len(splits[split]))))
    for split, needed in (
        ("train", training_args.do_train),
        ("validation", training_args.do_train or training_args.do_eval),
        ("test", training_args.do_predict),
    ):
        if needed and split not in splits:
            raise ValueError(
                f"the {split} split is needed but was not found; give it with --data_dir or --{split}_file"
            )


def check_trained_model_settings(
    model: PreTrainedModel,
    processor: HVPNetProcessor,
    config_overrides: dict[str, Any],
    vision_backbone: str | None,
    image_size: int | None,
) -> None:
    """
    A trained folder brings its own architecture and image processing: refuses a `config_overrides` setting, a
    `vision_backbone` or an `image_size` that the loaded model or its processor does not have, since it would be
    ignored.
    """
    settings = {**config_overrides, **({"vision_backbone": vision_backbone} if vision_backbone else {})}
    ignored = [
        f"{name}={value!r} (the model has {getattr(model.config, name)!r})"
        for name, value in settings.items()
        if value != getattr(model.config, name)
    ]
    own_size = processor.image_processor.image_size
    if image_size is not None and image_size != own_size:
        ignored.append(f"image_size={image_size!r} (its processor has {own_size!r})")
    if ignored:
        raise ValueError(
            f"model_name_or_path {model.name_or_path} is a trained model, which keeps its own settings; these would "
            f"be ignored: {', '.join(ignored)}. Leave them out (or train a new model)"
        )


def check_max_seq_length(model: PreTrainedModel, max_seq_length: int) -> None:
    """Refuses a `max_seq_length` beyond the positions of the model's text encoder."""
    limit = model.base_model.max_text_length
    if max_seq_length > limit:
        raise ValueError(
            f"max_seq_length must be at most {limit}, the tokens the text model of {model.name_or_path} takes, "
            f"got {max_seq_length}"
        )


# The arguments both training scripts take besides `HVPNetTrainingArguments`; each script subclasses
# `DataTrainingArguments` for what its task adds (its data set's name, its label columns, its release loader).
@dataclass
class ModelArguments:
    """Which model to fine-tune: a new one on a pretrained text encoder, or a trained HVPNeT folder."""

    text_model_name_or_path: str = field(
        default="bert-base-uncased",
        metadata={"help": "Pretrained BERT-family text encoder (name or path): BERT, RoBERTa, XLM-R, ELECTRA, ..."},
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A trained HVPNeT folder of the script's task to start from instead (e.g. to evaluate it only)."
        },
    )
    vision_backbone: str | None = field(
        default=None,
        metadata={"help": "timm backbone with features_only support (a new model: HVPNetConfig's, resnet50)."},
    )
    vision_pretrained: bool = field(
        default=False, metadata={"help": "Start the backbone from timm's pretrained weights (the paper's setting)."}
    )
    vision_checkpoint: str | None = field(
        default=None, metadata={"help": "Local file with backbone weights (instead of downloading them)."}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "HVPNetConfig settings of a new model, e.g. 'prefix_mode=flat,num_object_images=2,"
            "vision_out_indices=[-2, -1]' (values read as YAML)."
        },
    )
    config_settings: dict[str, Any] = field(init=False, default_factory=dict)

    def __post_init__(self):
        self.config_settings = parse_config_overrides(self.config_overrides)


@dataclass
class DataTrainingArguments:
    """
    The data to train and evaluate on, and how it is read: a published release (`data_dir`, or split files in its
    format), or a data set of the user's own (`dataset_name`, or JSON lines / CSV / Parquet split files) read from
    the columns the `*_column_name` flags name. Each script's subclass gives its `task`, its label column's default
    and its release loader (`load_release`).
    """

    task: ClassVar[str]

    dataset: str = field(
        default="sample",
        metadata={
            "help": "Name of the data set, written in the model card (any name works). 'sample' without data_dir or "
            "data files uses the bundled sample set."
        },
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A `datasets` data set of your own: a Hub id (read through the local cache when offline) or a "
            "folder written by save_to_disk (its name is written in the model card)."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The configuration of dataset_name."})
    data_dir: str | None = field(
        default=None, metadata={"help": "Folder with the split files, named *train*, *val* / *dev* / *valid*, *test*."}
    )
    train_file: str | None = field(default=None, metadata={"help": SPLIT_FILE_HELP})
    validation_file: str | None = field(default=None, metadata={"help": SPLIT_FILE_HELP})
    test_file: str | None = field(default=None, metadata={"help": SPLIT_FILE_HELP})
    text_column_name: str = field(
        default="tokens", metadata={"help": "Own data: the column of the words (a list of strings per row)."}
    )
    image_column_name: str = field(
        default="image",
        metadata={"help": "Own data: the column of the image (an Image() feature or a path; empty: no image)."},
    )
    objects_column_name: str = field(
        default="objects", metadata={"help": "Own data: the column of the object crops (a list of images or paths)."}
    )
    image_dir: str | None = field(
        default=None, metadata={"help": "Folder of the images, flat or as {train,val,test}/."}
    )
    object_dir: str | None = field(
        default=None, metadata={"help": "Folder of the object crops, flat or as {train,val,test}/crops/."}
    )
    object_map_dir: str | None = field(
        default=None,
        metadata={"help": "Folder with the crop maps *_{train,val|dev,test}_dict.pth (default: data_dir)."},
    )
    mask_images: bool = field(
        default=False, metadata={"help": "Mask every image: the same model, trained and evaluated on text only."}
    )
    missing_images: str = field(default="mask", metadata={"choices": ["mask", "error"]})
    sample_ratio: float = field(default=1.0, metadata={"help": "Train on this random share of the training set."})
    max_seq_length: int = field(
        default=128,
        metadata={
            "help": "Longer inputs are cut (NER: cut words count as O; RE: the tokens nearest the markers stay)."
        },
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
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Train into a non-empty output_dir: its checkpoints, results and predictions are deleted first "
            "(without this flag or --resume_from_checkpoint, a non-empty output_dir is refused)."
        },
    )
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Own data: read the splits as IterableDatasets, row by row, in bounded memory (training needs "
            "--max_steps; no feature cache)."
        },
    )
    label_set: list[str] | None = field(
        default=None,
        metadata={
            "help": "With --streaming, the label set of a new model when the label column holds names (no split is "
            "read ahead to find them), e.g. O B-PER I-PER B-LOC I-LOC."
        },
    )
    # With --streaming, the images of the rows read so far, counted as they are read (see `report_streamed_images`).
    image_counts: ImageCounts | None = field(init=False, default=None)

    def __post_init__(self):
        for name in ("max_seq_length", "image_size", "max_train_samples", "max_eval_samples", "max_predict_samples"):
            check_range(self, name, 1)
        if not 0.0 < self.sample_ratio <= 1.0:
            raise ValueError(f"sample_ratio must be in (0, 1], got {self.sample_ratio}")
        files = list((self.data_files or {}).values())
        if self.dataset_name is not None and (files or self.data_dir is not None):
            raise ValueError("give either --dataset_name or data files (--data_dir, --train_file, ...), not both")
        if len({is_table_file(path) for path in files}) > 1:
            raise ValueError(f"split files must all be release files or all table files, got {files}")
        if self.own_data:
            release_flags = [f"--{name}" for name in RELEASE_FLAGS if getattr(self, name, None) is not None]
            if release_flags:
                raise ValueError(
                    f"{', '.join(release_flags)}: settings of the published formats; a data set of your own names "
                    "its images and crops in its columns (--image_column_name, --objects_column_name)"
                )
        if self.streaming and not self.own_data:
            raise ValueError(
                "--streaming reads a data set of your own (--dataset_name, or JSON lines, CSV or Parquet files); a "
                "published release is read into memory: pack it first with hvpnet-pack-dataset"
            )
        if self.streaming and self.sample_ratio != 1.0:
            raise ValueError("--sample_ratio draws from the whole training set, which --streaming does not hold")
        if self.label_set is not None and not self.streaming:
            raise ValueError("--label_set is for --streaming; otherwise the label set is read from the data")

    @property
    def data_files(self) -> dict[str, str] | None:
        files = {"train": self.train_file, "validation": self.validation_file, "test": self.test_file}
        return {split: path for split, path in files.items() if path is not None} or None

    @property
    def own_data(self) -> bool:
        """Whether the data is a `datasets` data set or table files rather than a published release."""
        return self.dataset_name is not None or any(is_table_file(path) for path in (self.data_files or {}).values())

    @property
    def columns(self) -> dict[str, str]:
        """Per loader column of the task, the column of the user's data set it is read from."""
        return {column: getattr(self, COLUMN_FLAGS[column]) for column in TASK_COLUMNS[self.task]}

    @property
    def card_name(self) -> str:
        """The data set's name in the model card: `dataset_name` (a folder's own name), else `dataset`."""
        return Path(self.dataset_name).name if self.dataset_name is not None else self.dataset

    def load_release(self, **sources: Any) -> DatasetDict:
        """The splits of a published release, read by the task's loader with `sources` (files, folders, policy)."""
        raise NotImplementedError


# The data flags that only the published formats use.
RELEASE_FLAGS = ("data_dir", "image_dir", "object_dir", "object_map_dir", "rel2id_file")


# The `TrainingArguments` defaults both scripts change (a config file or flag overrides them); each adds its own.
TRAINING_DEFAULTS = {
    "do_train": True,
    "do_eval": True,
    "do_predict": True,
    "eval_strategy": "epoch",
    "save_strategy": "epoch",
    "logging_strategy": "epoch",
    "load_best_model_at_end": True,
    "metric_for_best_model": "f1",
    "save_total_limit": 2,
    "weight_decay": 0.01,
    "warmup_steps": 0.1,
    # Without an accelerator, torchrun / accelerate launch processes only form a (gloo) group under use_cpu.
    "use_cpu": not torch.accelerator.is_available(),
}


def start_run(training_args: TrainingArguments, data_args: DataTrainingArguments, logger: logging.Logger) -> bool:
    """
    The first steps of a run: the settings the scripts need (path columns reach the collator; the output folder is
    published once, at the end), logging, the reused output folder rule and the seed. Returns whether to push the
    output folder to the Hub at the end.
    """
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
    if data_args.streaming and training_args.do_train and training_args.max_steps <= 0:
        raise ValueError(
            "--streaming trains for --max_steps steps: a stream has no length to count epochs in; give --max_steps"
        )
    if training_args.do_train and keep_freed_memory():
        logger.info("glibc's malloc keeps the memory the run frees for reuse (hvpnet_hf.training.keep_freed_memory)")
    prepare_output_dir(training_args, data_args.overwrite_output_dir)
    set_seed(training_args.seed)
    return push_to_hub


def load_splits(
    model_args: ModelArguments, data_args: DataTrainingArguments, training_args: TrainingArguments
) -> DatasetDict:
    """
    The run's splits in the loaders' columns: the bundled sample set, a published release with its images, crops and
    crop maps found in its layout, or a data set of the user's own (see `hvpnet_hf.data_sources`); then sampled and
    cut as asked (`select_splits`).
    """
    if data_args.dataset == "sample":
        use_sample_set(data_args, data_args.task)
    if data_args.own_data:
        trained = model_args.model_name_or_path
        if trained is not None and data_args.label_set is not None:
            raise ValueError(f"--label_set: the trained model {trained} reads the data with its own labels")
        model_labels = None if trained is None else list(AutoConfig.from_pretrained(trained).id2label.values())
        reading = {
            "dataset_name": data_args.dataset_name,
            "dataset_config_name": data_args.dataset_config_name,
            "data_files": data_args.data_files,
            "label_names": model_labels or data_args.label_set,
            "missing_images": data_args.missing_images,
            "mask_images": data_args.mask_images,
        }
        if data_args.streaming:
            splits, data_args.image_counts = stream_table_dataset(data_args.task, data_args.columns, **reading)
        else:
            splits = load_table_dataset(data_args.task, data_args.columns, **reading, text_only=TEXT_ONLY)
    else:
        image_dir, object_dir = (None, None) if data_args.mask_images else (data_args.image_dir, data_args.object_dir)
        layout = find_release_layout(image_dir, object_dir, data_args.object_map_dir or data_args.data_dir)
        splits = data_args.load_release(
            data_dir=data_args.data_dir,
            data_files=data_args.data_files,
            missing_images=data_args.missing_images,
            **layout,
        )
        if image_dir is not None:
            check_images_found_in_splits(splits, layout["image_dir"], "image_dir", TEXT_ONLY)
    select_splits(splits, data_args, training_args)
    return splits


def load_processor_and_model(
    model_args: ModelArguments,
    data_args: DataTrainingArguments,
    model_class: type[HVPNetPreTrainedModel],
    splits: DatasetDict,
) -> tuple[HVPNetProcessor, HVPNetPreTrainedModel]:
    """The processor and the model of the run: a trained folder, or a new model with the labels of `splits`."""
    if model_args.model_name_or_path is not None:
        processor = HVPNetProcessor.from_pretrained(model_args.model_name_or_path)
        model = model_class.from_pretrained(model_args.model_name_or_path)
        check_trained_model_settings(
            model, processor, model_args.config_settings, model_args.vision_backbone, data_args.image_size
        )
    else:
        new_config = HVPNetConfig(**model_args.config_settings)  # the settings the processor shares with the model
        vision_backbone = model_args.vision_backbone or new_config.vision_backbone
        processor = HVPNetProcessor.from_backbone(
            model_args.text_model_name_or_path,
            vision_backbone=vision_backbone,
            task=data_args.task,
            image_size=data_args.image_size,
            num_object_images=new_config.num_object_images,
            max_length=data_args.max_seq_length,
        )
        label_names = label_names_of(splits, data_args.task)
        model = model_class.from_text_vision_pretrained(
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
    return processor, model


def encode_splits(
    splits: DatasetDict | IterableDatasetDict,
    processor: HVPNetProcessor,
    model: PreTrainedModel,
    data_args: DataTrainingArguments,
    training_args: TrainingArguments,
) -> tuple[DatasetDict | IterableDatasetDict, DatasetDict | IterableDatasetDict]:
    """
    `splits` with their labels on the model's ids (see `labels_on_model_ids`), and the same tokenized (once, on the
    main process first; a stream as its rows are read; images stay paths or undecoded values for the collator).
    Streamed splits are already on the model's ids: their label set is the model's, or the model was built on it.
    """
    column = LABEL_COLUMNS[data_args.task]
    id2label = model.config.id2label
    splits = type(splits)(
        {
            split: labels_on_model_ids(dataset, column, id2label, model.name_or_path)
            for split, dataset in splits.items()
        }
    )
    tokenizing = {"processor": processor, "max_length": data_args.max_seq_length}
    if isinstance(splits, IterableDatasetDict):
        return splits, splits.map(tokenize_and_align, batched=True, fn_kwargs=tokenizing)
    with training_args.main_process_first(desc="tokenizing"):
        encoded = splits.map(tokenize_and_align, batched=True, fn_kwargs=tokenizing, desc="Tokenizing")
    return splits, encoded


def build_trainer(
    model: PreTrainedModel,
    processor: HVPNetProcessor,
    encoded: DatasetDict,
    data_args: DataTrainingArguments,
    training_args: TrainingArguments,
    compute_metrics: Callable | None,
) -> HVPNetTrainer:
    """
    The run's trainer, reading image features from the frozen backbone's cache when `feature_cache` is on (never
    with `streaming`: the cache is built in a pass over every image before training).
    """
    feature_cache = None
    if data_args.feature_cache and data_args.streaming:
        logger.info("--streaming: no feature cache; the images are decoded when each batch is drawn")
    elif data_args.feature_cache:
        feature_cache = build_feature_cache(
            model, processor, encoded.values(), data_args.feature_cache_dir, data_args.missing_images
        )
    return HVPNetTrainer(
        model=model,
        args=training_args,
        train_dataset=encoded["train"] if training_args.do_train else None,
        eval_dataset=encoded.get("validation"),
        processing_class=processor,
        data_collator=HVPNetDataCollator(
            processor, missing_images=data_args.missing_images, feature_cache=feature_cache
        ),
        compute_metrics=compute_metrics,
    )


def train_and_save(
    trainer: HVPNetTrainer, training_args: TrainingArguments, train_split: Dataset | IterableDataset
) -> dict[str, float]:
    """
    Trains, saves the best checkpoint (with its processor and code), its metrics (with the size of the training set,
    unknown for a stream) and the trainer state.
    """
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()  # the best checkpoint on validation F1, its processor, their code and the pipeline's
    size = {"train_samples": len(train_split)} if isinstance(train_split, Dataset) else {}
    metrics = {**train_result.metrics, **size}
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    return metrics


def predict_split(
    trainer: HVPNetTrainer, split: Dataset | IterableDataset, prefix: str
) -> tuple[PredictionOutput, dict[str, float]]:
    """The predictions and metrics of one split (`prefix`: `eval` or `test`), logged and saved."""
    prediction = trainer.predict(split, metric_key_prefix=prefix)
    num_examples = len(split) if isinstance(split, Dataset) else len(prediction.label_ids)  # a stream's, as read
    metrics = {**prediction.metrics, f"{prefix}_samples": num_examples}
    trainer.log_metrics(prefix, metrics)
    trainer.save_metrics(prefix, metrics)
    return prediction, metrics


def column_values(split: Dataset | IterableDataset, column: str) -> list:
    """The values of one column of a split, in order (a streamed split is read once for them)."""
    if isinstance(split, Dataset):
        return split[column]
    return [row[column] for row in split.select_columns([column])]


def report_streamed_images(data_args: DataTrainingArguments) -> None:
    """With `streaming`, logs the images masked as missing in the rows the run read (see `ImageCounts.report`)."""
    if data_args.image_counts is not None:
        data_args.image_counts.report(TEXT_ONLY)


__all__ = [
    "TEXT_ONLY",
    "TRAINING_DEFAULTS",
    "DataTrainingArguments",
    "ModelArguments",
    "build_trainer",
    "check_max_seq_length",
    "check_range",
    "check_trained_model_settings",
    "column_values",
    "encode_splits",
    "load_processor_and_model",
    "load_splits",
    "parse_config_overrides",
    "parse_settings_and_flags",
    "predict_split",
    "prepare_output_dir",
    "report_streamed_images",
    "select_splits",
    "start_run",
    "train_and_save",
    "use_sample_set",
]
