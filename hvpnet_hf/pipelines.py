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
"""

import re
from collections.abc import Mapping, Sequence, Sized
from typing import Any

import torch
from seqeval.metrics.sequence_labeling import get_entities
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.pipelines.pt_utils import PipelineDataset, PipelineIterator

from .collating import HVPNetDataCollator
from .object_detection import ObjectCropper, object_cropper_for
from .processing_hvpnet import HVPNetProcessor


class _HVPNetPipeline(Pipeline):
    """What both pipelines share: the processor, and batching of examples with different text lengths."""

    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False
    _load_video_processor = False

    def __init__(self, model, processor: HVPNetProcessor | None = None, **kwargs):
        if processor is None:
            processor = HVPNetProcessor.from_pretrained(model.name_or_path)
        super().__init__(model=model, processor=processor, tokenizer=processor.tokenizer, **kwargs)
        self.collator = HVPNetDataCollator(processor)
        self.model.eval()  # the NER head decodes tags in eval mode only

    def get_iterator(self, inputs, num_workers, batch_size, preprocess_params, forward_params, postprocess_params):
        # As the base class does, but with `_collate`: transformers' default collation pads `pixel_values` only
        # through an image processor, which HVPNeT's processor does not have.
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
        batch: dict[str, Any] = self.collator(features)
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
        for entity_type, first, last in get_entities(word_tags):
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

__all__ = ["MultimodalNerPipeline", "MultimodalRePipeline"]
