"""
Inference pipelines, registered with transformers' pipeline registry when `hvpnet_hf` is imported:

```python
import hvpnet_hf
from transformers import pipeline

ner = pipeline("multimodal-ner", model="path/to/hvpnet-ner")
ner({"text": "Liverpool is lovely today", "image": "photo.jpg", "objects": ["crop0.jpg"]})

relation = pipeline("multimodal-re", model="path/to/hvpnet-re")
relation({"words": ["Alice", "met", "Bob"], "head": (0, 1), "tail": (2, 3), "image": "photo.jpg"}, top_k=3)
```

Both take one example (a dict, or for NER also a plain string) or a list of them (`batch_size=` batches them), and
images as PIL images, file paths or None (the image is then masked and the prediction is text-only). An image file
that cannot be read is an error, or with `missing_images="mask"` masked like an absent one (and logged).

`objects="detect"` (with `detector=`, a Hub id or folder of a detection model) or `objects=ObjectCropper(...)` finds
object crops for inputs that have an image but no crops (see `object_detection.py`).

A pipeline's `save_pretrained` (and `save_pipeline_code`) also copies this file (with `object_detection.py`) next to
the model and records the pipeline in the config's `custom_pipelines`, so `pipeline(model=folder_or_hub_id,
trust_remote_code=True)` builds it where `hvpnet_hf` is not installed. This module therefore imports only
transformers, torch and the processor.
"""

import os
import re
from collections.abc import Mapping, Sequence, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    Pipeline,
    PreTrainedModel,
)
from transformers.dynamic_module_utils import custom_object_save
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.pipelines.pt_utils import PipelineDataset, PipelineIterator

from .object_detection import ObjectCropper, object_cropper_for
from .processing_hvpnet import HVPNetProcessor


class _HVPNetPipeline(Pipeline):
    """What both pipelines share: the processor, and batching of examples with different text lengths."""

    # `pipeline(...)` builds the processor with `AutoProcessor.from_pretrained(model, revision=..., token=...)`; when
    # it cannot (a model object without its processor), `__init__` reads it from `model.name_or_path`.
    _load_processor = None
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False
    _load_video_processor = False
    # The task a saved model records in `config.custom_pipelines`, and the Auto class that loads its model. It is
    # not the registered task name: `pipeline("multimodal-ner", model=...)` would otherwise take the saved copy of
    # this code (and ask for trust_remote_code) even where `hvpnet_hf` is imported.
    saved_task: str
    auto_model_class: type

    def __init__(self, model, processor: HVPNetProcessor | None = None, **kwargs):
        if processor is None:
            processor = HVPNetProcessor.from_pretrained(model.name_or_path)
        super().__init__(model=model, processor=processor, tokenizer=processor.tokenizer, **kwargs)
        self.model.eval()  # the NER head decodes tags in eval mode only

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Saves the model, the processor and this pipeline's code (see `save_pipeline_code`)."""
        save_pipeline_code(self.model, save_directory)
        self.model.save_pretrained(save_directory, **kwargs)
        self.processor.save_pretrained(save_directory)

    def get_iterator(self, inputs, num_workers, batch_size, preprocess_params, forward_params, postprocess_params):
        # As the base class does, but with `_collate`: transformers' default collation knows neither the object
        # crops nor the image masks; the processor pads the text and stacks the images with their masks.
        if isinstance(inputs, Sized):
            dataset = PipelineDataset(inputs, self.preprocess, preprocess_params)
        else:  # a generator: read in this process
            dataset, num_workers = PipelineIterator(inputs, self.preprocess, preprocess_params), 0
        loader = DataLoader(dataset, num_workers=num_workers, batch_size=batch_size, collate_fn=self._collate)
        model_iterator = PipelineIterator(loader, self.forward, forward_params, loader_batch_size=batch_size)
        return PipelineIterator(model_iterator, self.postprocess, postprocess_params)

    def _collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Joins `preprocess` outputs (tensors with a batch dimension of 1) into one batch; other values to lists."""
        features = [
            {name: value[0] for name, value in item.items() if isinstance(value, torch.Tensor)} for item in items
        ]
        batch: dict[str, Any] = dict(self.processor.pad(features))
        for name, first in items[0].items():
            if not isinstance(first, torch.Tensor):
                batch[name] = [item[name] for item in items]
        return batch

    def _object_parameters(self, objects: str | ObjectCropper | None, detector) -> dict[str, ObjectCropper]:
        """`objects="detect"` (with `detector=`) or an `ObjectCropper`: crops found for inputs that have none."""
        if objects is None:
            return {}
        current = getattr(self, "_object_cropper", None)
        self._object_cropper = object_cropper_for(objects, detector, self.processor.num_object_images, current)
        return {"object_cropper": self._object_cropper}

    def _encode(
        self,
        words: list[str],
        example: Mapping,
        missing_images: str,
        object_cropper: ObjectCropper | None = None,
        **task_inputs,
    ) -> dict[str, Any]:
        objects = example.get("objects") or []
        if object_cropper is not None and not objects:
            objects = object_cropper.crops_for_text(
                example.get("image"), words, task_inputs.get("head"), task_inputs.get("tail")
            )
        return dict(
            self.processor(
                words,
                image=example.get("image"),
                objects=objects,
                missing_images=missing_images,
                **task_inputs,
            )
        )


class MultimodalNerPipeline(_HVPNetPipeline):
    """
    Named entities of a text and its image.

    Input: a string (text only), or a dict with `"text"` (a string, split on whitespace) or `"words"` (a list of
    words), and optionally `"image"` and `"objects"` (object crops). Output per example: a list of entities
    `{"entity_group", "score", "word", "word_start", "word_end", "start", "end"}` with the word span
    `[word_start, word_end)` and, when text was given, the character span `[start, end)`. The CRF's tags decide the
    entities; `score` is the mean probability the emission layer gives the tags of the entity's words (the CRF's
    transition scores are not in it).
    """

    saved_task = "hvpnet-ner"
    auto_model_class = AutoModelForTokenClassification

    def _sanitize_parameters(
        self, max_length: int | None = None, missing_images: str | None = None, objects=None, detector=None, **kwargs
    ):
        preprocess = {
            **_preprocess_parameters(max_length, missing_images),
            **self._object_parameters(objects, detector),
        }
        return preprocess, {}, {}

    def preprocess(
        self,
        inputs: str | Mapping,
        max_length: int | None = None,
        missing_images: str = "error",
        object_cropper: ObjectCropper | None = None,
    ) -> dict[str, Any]:
        example = {"text": inputs} if isinstance(inputs, str) else inputs
        if "words" in example:
            words, offsets = list(example["words"]), None
        elif "text" in example:
            matches = list(re.finditer(r"\S+", example["text"]))
            words, offsets = [match.group() for match in matches], [match.span() for match in matches]
        else:
            raise ValueError(f"a multimodal-ner input needs 'text' or 'words', got keys {sorted(example)}")
        if not words:
            raise ValueError("a multimodal-ner input needs at least one word")
        encoded = self._encode(words, example, missing_images, object_cropper, max_length=max_length)
        encoded["example"] = {"words": words, "offsets": offsets}
        return encoded

    def _forward(self, model_inputs: dict[str, Any]) -> dict[str, Any]:
        example = model_inputs.pop("example")
        outputs = self.model(**model_inputs)
        probabilities = outputs.logits.softmax(dim=-1)
        tags = outputs.predicted_tags
        tag_probabilities = probabilities.gather(-1, tags.clamp(min=0)[..., None])[..., 0]
        return {"predicted_tags": tags, "tag_probabilities": tag_probabilities, "example": example}

    def postprocess(self, model_outputs: dict[str, Any]) -> list[dict[str, Any]]:
        example = model_outputs["example"]
        words, offsets = example["words"], example["offsets"]
        tags = model_outputs["predicted_tags"][0]
        is_word = tags != -100
        word_tags = [self.model.config.id2label[int(tag)] for tag in tags[is_word]]
        word_probabilities = model_outputs["tag_probabilities"][0][is_word].tolist()
        # Words cut by truncation get no tag from the model: "O".
        word_tags += ["O"] * (len(words) - len(word_tags))
        entities = []
        for entity_type, first, last in bio_entities(word_tags):
            entity = {
                "entity_group": entity_type,
                "score": sum(word_probabilities[first : last + 1]) / (last + 1 - first),
                "word": " ".join(words[first : last + 1]),
                "word_start": first,
                "word_end": last + 1,
            }
            if offsets is not None:
                entity["start"], entity["end"] = offsets[first][0], offsets[last][1]
            entities.append(entity)
        return entities


class MultimodalRePipeline(_HVPNetPipeline):
    """
    The relation between two entities of a text, helped by its image.

    Input: a dict with `"words"` (list of words), `"head"` and `"tail"` (word spans `(start, end)`, end exclusive,
    or `{"start", "end"}`), and optionally `"image"` and `"objects"`. Output per example: `{"relation", "score"}`, or
    with `top_k=k` the k most probable relations as a list, best first.
    """

    saved_task = "hvpnet-re"
    auto_model_class = AutoModelForSequenceClassification

    def _sanitize_parameters(
        self,
        top_k: int | None = None,
        max_length: int | None = None,
        missing_images: str | None = None,
        objects=None,
        detector=None,
        **kwargs,
    ):
        postprocess = {"top_k": top_k} if top_k is not None else {}
        preprocess = {
            **_preprocess_parameters(max_length, missing_images),
            **self._object_parameters(objects, detector),
        }
        return preprocess, {}, postprocess

    def preprocess(
        self,
        inputs: Mapping,
        max_length: int | None = None,
        missing_images: str = "error",
        object_cropper: ObjectCropper | None = None,
    ) -> dict[str, Any]:
        missing = [key for key in ("words", "head", "tail") if key not in inputs]
        if missing:
            raise ValueError(f"a multimodal-re input needs 'words', 'head' and 'tail'; missing {missing}")
        words = list(inputs["words"])
        spans = {role: _span(inputs[role], role, len(words)) for role in ("head", "tail")}
        return self._encode(words, inputs, missing_images, object_cropper, max_length=max_length, **spans)

    def _forward(self, model_inputs: dict[str, Any]) -> dict[str, Any]:
        return {"probabilities": self.model(**model_inputs).logits.softmax(dim=-1)}

    def postprocess(self, model_outputs: dict[str, Any], top_k: int | None = None) -> dict | list[dict]:
        probabilities = model_outputs["probabilities"][0]
        scores, labels = probabilities.topk(min(top_k or 1, len(probabilities)))
        ranked = [
            {"relation": self.model.config.id2label[int(label)], "score": float(score)}
            for score, label in zip(scores, labels, strict=True)
        ]
        return ranked if top_k is not None else ranked[0]


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


def save_pipeline_code(model: PreTrainedModel, save_directory: str | os.PathLike) -> None:
    """
    Records the model's pipeline in `model.config.custom_pipelines` and copies this file (with the processor files
    it imports) to `save_directory`, so `pipeline(model=save_directory_or_hub_id, trust_remote_code=True)` builds it
    without `hvpnet_hf`. Also maps `AutoModel` to the encoder without a head (`HVPNetModel`), which the model's own
    save does not record for a model with a head. The model (or its config) must be saved to the folder afterwards.
    """
    pipeline_class = PIPELINE_FOR_MODEL[type(model).__name__]
    model.config.custom_pipelines = {
        pipeline_class.saved_task: {
            "impl": f"{pipeline_class.__module__.split('.')[-1]}.{pipeline_class.__name__}",
            "pt": [pipeline_class.auto_model_class.__name__],
            "type": "multimodal",
        }
    }
    modeling_module = type(model).__module__.split(".")[-1]
    model.config.auto_map = {
        **(getattr(model.config, "auto_map", None) or {}),
        "AutoModel": f"{modeling_module}.HVPNetModel",
    }
    os.makedirs(save_directory, exist_ok=True)
    custom_object_save(pipeline_class, save_directory)


def _preprocess_parameters(max_length: int | None, missing_images: str | None) -> dict[str, Any]:
    parameters = {"max_length": max_length, "missing_images": missing_images}
    return {name: value for name, value in parameters.items() if value is not None}


def _span(span: Sequence[int] | Mapping, role: str, num_words: int) -> dict[str, int]:
    """A `(start, end)` or `{"start", "end"}` word span, checked against the sentence length."""
    start, end = (span["start"], span["end"]) if isinstance(span, Mapping) else span
    if not 0 <= start < end <= num_words:
        raise ValueError(f"{role} span [{start}, {end}) is not a word span of the {num_words}-word input")
    return {"start": int(start), "end": int(end)}


PIPELINE_REGISTRY.register_pipeline(
    "multimodal-ner", pipeline_class=MultimodalNerPipeline, pt_model=AutoModelForTokenClassification, type="multimodal"
)
PIPELINE_REGISTRY.register_pipeline(
    "multimodal-re",
    pipeline_class=MultimodalRePipeline,
    pt_model=AutoModelForSequenceClassification,
    type="multimodal",
)

# The pipeline of each HVPNeT head, by model class name (the classes may come from a model repository's code).
PIPELINE_FOR_MODEL = {
    "HVPNetForTokenClassification": MultimodalNerPipeline,
    "HVPNetForSequenceClassification": MultimodalRePipeline,
}

__all__ = ["MultimodalNerPipeline", "MultimodalRePipeline", "bio_entities", "save_pipeline_code"]
