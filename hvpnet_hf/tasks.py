"""
The package's three tasks, by the head class that serves each: the one lookup from a model (its class or its config's
`architectures`) to its task and pipeline, and what a saved model records so that `pipeline(model=folder,
trust_remote_code=True)` builds that pipeline where `hvpnet_hf` is not installed.

The model module and the pipelines both import this module, and it imports neither of them: a model saves its
pipeline's record and code without loading transformers' pipelines. Like the files it copies, it is saved with a
model, so it imports only transformers.
"""

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedConfig, PreTrainedModel
from transformers.dynamic_module_utils import get_relative_import_files


@dataclass(frozen=True)
class Task:
    """One task: its name (`"ner"`, `"re"` or `"gmner"`: what `task_of` gives, and the key of its pipeline in a saved config's
    `custom_pipelines`), the head class and Auto class of its models, its pipeline (a class of `pipelines.py`) and
    the Hub's pipeline tag of its models (`hub_pipeline_tag`, which a model card records)."""

    name: str
    model_class: str
    auto_model_class: str
    pipeline_class: str
    hub_pipeline_tag: str

    @property
    def pipeline_task(self) -> str:
        """
        The name the installed pipeline is registered under, `"multimodal-<name>"`. It cannot be the task's name:
        transformers reads `"ner"` as token classification, and `pipeline()` looks a task up in the model's
        `custom_pipelines` first, where it would ask for `trust_remote_code` even with `hvpnet_hf` installed.
        """
        return f"multimodal-{self.name}"


NER = Task(
    "ner",
    "HVPNetForTokenClassification",
    "AutoModelForTokenClassification",
    "MultimodalNerPipeline",
    "token-classification",
)
RE = Task(
    "re",
    "HVPNetForSequenceClassification",
    "AutoModelForSequenceClassification",
    "MultimodalRePipeline",
    "text-classification",
)
# Grounded NER has a head of its own on the same configuration. transformers maps a configuration class to one model
# class per Auto class, and `AutoModelForTokenClassification` already loads the NER head: the grounding head is
# loaded by the Auto class of transformers' text-grounded region models (Grounding DINO, OWL-ViT). Its Hub tag is that
# of its output, entities.
GMNER = Task(
    "gmner",
    "HVPNetForGroundedTokenClassification",
    "AutoModelForZeroShotObjectDetection",
    "MultimodalGroundedNerPipeline",
    "token-classification",
)
TASKS = {task.name: task for task in (NER, RE, GMNER)}
TASK_OF_MODEL = {task.model_class: task for task in TASKS.values()}
PIPELINES_FILE = Path(__file__).with_name("pipelines.py")


def task_of_architectures(architectures: list[str] | None, source: str | os.PathLike) -> Task:
    """The task of a model whose config records `architectures`; an error naming `source` unless exactly one
    HVPNeT head is among them."""
    tasks = {TASK_OF_MODEL[name] for name in architectures or [] if name in TASK_OF_MODEL}
    if len(tasks) != 1:
        raise ValueError(
            f"{source}: expected an HVPNeT NER or RE model (or a grounded NER one), found architectures {architectures}"
        )
    return tasks.pop()


def task_of(model: str | os.PathLike) -> str:
    """The task ("ner", "re" or "gmner") of a saved HVPNeT model (folder or Hub id), read from its config's `architectures`."""
    config, _ = PreTrainedConfig.get_config_dict(model)
    return task_of_architectures(config.get("architectures"), model).name


def save_pipeline_code(model: PreTrainedModel, save_directory: str | os.PathLike) -> None:
    """
    Records the pipeline of a task model in `model.config.custom_pipelines` and copies `pipelines.py` (with the
    package files it imports) to `save_directory`, so `pipeline(model=save_directory_or_hub_id,
    trust_remote_code=True)` builds it without `hvpnet_hf`. Also maps `AutoModel` to the encoder without a head
    (`HVPNetModel`), which the model's own save does not record for a model with a head. As transformers records
    `architectures` and `auto_map` when it saves, this runs when the model is saved, before its config is written.
    """
    task = TASK_OF_MODEL[type(model).__name__]
    model.config.custom_pipelines = {
        task.name: {
            "impl": f"{PIPELINES_FILE.stem}.{task.pipeline_class}",
            "pt": [task.auto_model_class],
            "type": "multimodal",
        }
    }
    modeling_module = type(model).__module__.split(".")[-1]
    auto_map = getattr(model.config, "auto_map", None) or {}
    model.config.auto_map = {**auto_map, "AutoModel": f"{modeling_module}.HVPNetModel"}
    os.makedirs(save_directory, exist_ok=True)
    for file in (PIPELINES_FILE, *get_relative_import_files(PIPELINES_FILE)):
        shutil.copyfile(file, Path(save_directory) / Path(file).name)


# The package's one BIO decoder (the pipelines, the grounding head, the demo and the attention analysis use it). Not
# seqeval's `get_entities`: that is importable only through `seqeval.metrics`, which loads scikit-learn and scipy on
# every `import hvpnet_hf`, and this file, copied next to saved models, imports only transformers.
# tests/test_pipelines.py checks that both read every tag sequence alike.
def bio_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """
    `(type, first, last)` word spans of the entities in a BIO tag sequence, read as seqeval (and conlleval) read it,
    so the pipeline's entities are the ones the NER metric scores: an entity starts at a `B-` tag, at an `I-` tag
    after `O` or after another type, and ends before the next start or `O`.
    """
    entities, current = [], None  # current: [type, first]
    for position, tag in enumerate([*tags, "O"]):
        prefix, entity_type = (tag[0], tag[2:]) if tag != "O" else ("O", "")
        continues = prefix == "I" and current is not None and current[0] == entity_type
        if current is not None and not continues:
            entities.append((current[0], current[1], position - 1))
            current = None
        if prefix in ("B", "I") and current is None:
            current = [entity_type, position]
    return entities


__all__ = [
    "GMNER",
    "NER",
    "RE",
    "TASKS",
    "TASK_OF_MODEL",
    "Task",
    "bio_entities",
    "save_pipeline_code",
    "task_of",
    "task_of_architectures",
]
