"""Model cards for trained HVPNeT models, rendered from `model_cards/` templates with `huggingface_hub.ModelCard`."""

from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from transformers import PretrainedConfig, Trainer, TrainingArguments

from .tasks import TASKS

# hvpnet_hf/model_cards links to the repository's model_cards/, so wheels carry the templates too: one per task,
# `hvpnet_<task name>.md`.
TEMPLATES_DIR = Path(__file__).parent / "model_cards"
SPLIT_PREFIXES = {"validation": "eval", "test": "test"}
# The validation score a card needs, by task: NER and RE scripts write `eval_f1`; run_gmner.py writes, per scored split,
# `<split>_candidate_recall` and `<split>_<regions>_<score>_f1` for the model's regions and each baseline's.
VALIDATION_SCORE = {"ner": "eval_f1", "re": "eval_f1", "gmner": "validation_model_gmner_f1"}
GMNER_SCORES = ("gmner", "mner", "eeg")
GMNER_BASELINES = ("none", "largest", "first")
SAMPLE_NOTE = "Trained on the small synthetic sample set bundled with hvpnet_hf: a demonstration, not a usable model."
# What a published repository holds, top-level files only: the weights, the config, the code of the model, the
# processor and the pipeline (loaded with trust_remote_code=True), the tokenizer, the processor settings, the card and
# the scores. Checkpoints, logs, predictions and the trainer's state stay local.
PUBLISHED = [
    "config.json",
    "model.safetensors",
    "model-*.safetensors",
    "model.safetensors.index.json",
    "*.py",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "README.md",
    "all_results.json",
]
NOT_PUBLISHED = ["*/*"]  # anything in a sub-folder (checkpoint-*/, runs/)


def training_hyperparameters(args: TrainingArguments) -> dict[str, Any]:
    """The settings of a `Trainer` run that a reader needs to reproduce it."""
    return {
        "learning rate": args.learning_rate,
        "head learning rate (CRF and emissions / relation classifier)": _own_learning_rate(args, "head_learning_rate"),
        "visual prefix learning rate": _own_learning_rate(args, "prefix_learning_rate"),
        "train batch size (total)": args.per_device_train_batch_size
        * args.gradient_accumulation_steps
        * max(args.world_size, 1),
        "epochs": args.num_train_epochs,
        "warm-up (steps or ratio, linear)": args.warmup_steps,
        "scheduler": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
        "weight decay (not on biases and LayerNorm)": args.weight_decay,
        "optimizer": str(getattr(args.optim, "value", args.optim)),
        "seed": args.seed,
        "model selection": f"best validation {args.metric_for_best_model}",
    }


def _own_learning_rate(args: TrainingArguments, name: str) -> float:
    """The learning rate `name` of `HVPNetTrainingArguments`, which is `learning_rate` when it is not set."""
    own = getattr(args, name, None)
    return args.learning_rate if own is None else own


def _is_hub_id(name: str) -> bool:
    """Whether `name` reads as a Hub repository id rather than a local folder."""
    return not Path(name).exists() and not name.startswith(("/", ".", "~")) and name.count("/") <= 1


def _format_score(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def render_model_card(
    task: str,
    config: PretrainedConfig,
    results: dict[str, float],
    dataset_name: str,
    text_model: str,
    hyperparameters: dict[str, Any],
    model_id: str,
    note: str | None = None,
) -> ModelCard:
    """
    Builds the model card of a trained model.

    Args:
        task: `"ner"`, `"re"` or `"gmner"`.
        config: the trained model's `HVPNetConfig`.
        results: a run's `all_results.json` content: validation scores as `eval_<metric>`, test as `test_<metric>`
            (grounded NER: the names of `VALIDATION_SCORE`'s note).
        dataset_name: the data set trained on, as people know it (e.g. `"twitter2015"`).
        text_model: name or path of the text encoder the model started from.
        hyperparameters: training settings, e.g. from `training_hyperparameters`.
        model_id: Hub repository id (or local folder) the card shows in its loading example.
        note: an optional warning shown under the title (e.g. for toy models).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {tuple(TASKS)}, got {task!r}")
    if VALIDATION_SCORE[task] not in results:
        raise ValueError(
            f"results carry no validation F1 ({VALIDATION_SCORE[task]!r}): render the card after evaluating the model"
        )
    spec = TASKS[task]
    if task == "gmner":
        scored = {split: f"{split}_model_gmner_f1" for split in SPLIT_PREFIXES if f"{split}_model_gmner_f1" in results}
        rows = [_gmner_row(results, split) for split in scored]
    else:
        scored = {split: f"{prefix}_f1" for split, prefix in SPLIT_PREFIXES.items() if f"{prefix}_f1" in results}
        rows = [
            {
                "split": split,
                **{name: _format_score(results.get(f"{prefix}_{name}")) for name in ("precision", "recall", "f1")},
            }
            for split, prefix in SPLIT_PREFIXES.items()
            if split in scored
        ]
    eval_results = [
        EvalResult(
            task_type=spec.hub_pipeline_tag,
            task_name=f"Multimodal {task.upper()}",
            dataset_type=dataset_name,
            dataset_name=dataset_name,
            dataset_split=split,
            metric_type="f1",
            metric_name="GMNER F1" if task == "gmner" else None,
            metric_value=results[key],
        )
        for split, key in scored.items()
    ]
    model_name = model_id.rstrip("/").split("/")[-1]
    card_data = ModelCardData(
        model_name=model_name,
        library_name="transformers",
        pipeline_tag=spec.hub_pipeline_tag,
        tags=["hvpnet", "multimodal", spec.pipeline_task, "visual-prefix"],
        datasets=[dataset_name],
        metrics=["precision", "recall", "f1"],
        eval_results=eval_results,
        base_model=text_model if _is_hub_id(text_model) else None,
        license="apache-2.0",
    )
    vision = f"{config.vision_backbone} ({'pretrained' if config.vision_pretrained else 'randomly initialized'})"
    labels = [config.id2label[index] for index in sorted(config.id2label)]
    architecture = {
        "text encoder": text_model,
        "hidden size / layers": f"{config.text_config.hidden_size} / {config.text_config.num_hidden_layers}",
        "vision backbone": vision,
        "frozen backbone": config.freeze_vision,
        "prefix mode": config.prefix_mode,
        "visual prefix": config.use_visual_prefix,
        "global image": config.use_global_image,
        "object crops per example": config.num_object_images,
        "prefix grid": f"{config.prefix_grid} x {config.prefix_grid}",
    }
    if task == "re":
        architecture["relation pooling"] = config.relation_pooling
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATES_DIR / f"hvpnet_{task}.md"),
        model_id=model_id,
        model_name=model_name,
        dataset=dataset_name,
        text_model=text_model,
        vision_description=vision,
        results_rows=rows,
        architecture=architecture,
        hyperparameters=hyperparameters,
        entity_types=", ".join(sorted({label[2:] for label in labels if label != "O"})),
        relations=", ".join(f"`{label}`" for label in labels),
        num_relations=len(labels),
        num_candidates=config.num_object_images,
        note=note,
    )


def _gmner_row(results: dict[str, float], split: str) -> dict[str, str]:
    """One split's row of a grounded NER card: its candidate recall, the model's GMNER / MNER / EEG F1 and each
    baseline's GMNER F1."""
    row = {"split": split, "candidate_recall": _format_score(results.get(f"{split}_candidate_recall"))}
    row.update({score: _format_score(results.get(f"{split}_model_{score}_f1")) for score in GMNER_SCORES})
    row.update({rule: _format_score(results.get(f"{split}_{rule}_gmner_f1")) for rule in GMNER_BASELINES})
    return row


def push_output_dir_to_hub(
    output_dir: str | Path,
    repo_id: str,
    token: str | None = None,
    private: bool | None = None,
    api: HfApi | None = None,
) -> str:
    """
    Publishes a run's output folder (model, processor and pipeline with their code, model card, results) to the Hub
    repository `repo_id`: the files `PUBLISHED` names, none from sub-folders. Returns the commit URL.
    """
    api = api or HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(output_dir),
        commit_message="Upload HVPNeT model, processor, pipeline and model card",
        allow_patterns=PUBLISHED,
        ignore_patterns=NOT_PUBLISHED,
    )
    return str(commit)


def save_model_card_and_push(
    trainer: Trainer, task: str, results: dict[str, float], dataset: str, text_model: str, push_to_hub: bool
) -> None:
    """
    Writes the model card of a `Trainer` run into its output folder (once validation was scored, on the main process)
    and, with `push_to_hub`, publishes the folder (see `push_output_dir_to_hub`). `dataset` "sample" marks the model
    as a demonstration.
    """
    if not (trainer.is_world_process_zero() and VALIDATION_SCORE[task] in results):
        return
    args = trainer.args
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    card = render_model_card(
        task,
        trainer.model.config,
        results,
        dataset,
        text_model,
        training_hyperparameters(args),
        args.hub_model_id or str(output_dir),
        note=SAMPLE_NOTE if dataset == "sample" else None,
    )
    card.save(output_dir / "README.md")
    if push_to_hub:
        trainer.save_model()  # also when nothing was trained
        repo_id = args.hub_model_id or output_dir.name
        push_output_dir_to_hub(output_dir, repo_id, token=args.hub_token, private=args.hub_private_repo)


__all__ = ["push_output_dir_to_hub", "render_model_card", "save_model_card_and_push", "training_hyperparameters"]
