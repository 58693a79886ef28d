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

Both take one example (a dict, or for NER also a plain string), or a list, torch `Dataset` or generator of them (one
result per input, in order; `batch_size=` batches them), and images as PIL images, numpy arrays, file paths,
`datasets.Image()` values (`{"bytes", "path"}`) or None (the image is then masked and the prediction is text-only);
`"image"` may list several images, the first one global (`image_slots` in `image_processing_hvpnet.py`). An image
file that cannot be read is an error, or with `missing_images="mask"` masked like an absent one (and logged); a URL
is an error under either policy (the pipeline does not download).

`num_workers=N` decodes and tokenizes the inputs of a list or `Dataset` in N DataLoader worker processes while the
model runs (a generator is read in the calling process). `pipeline(..., dtype=torch.bfloat16)` runs the model in
bfloat16 (its CRF in float32); scores are computed in float32 from its logits.

`objects="detect"` (with `detector=`, a Hub id or folder of a detection model) or `objects=ObjectCropper(...)` finds
object crops for inputs that have an image but no crops (see `object_detection.py`).

A pipeline's `save_pretrained` (and every save of a task model, see `tasks.save_pipeline_code`) also copies this file (with `object_detection.py`,
`frozen_backbone.py` and `tasks.py`) next to
the model and records the pipeline in the config's `custom_pipelines`, so `pipeline(model=folder_or_hub_id,
trust_remote_code=True)` builds it where `hvpnet_hf` is not installed. This module therefore imports only
transformers, torch and the processor (with its image processor).
"""

import os
import re
from collections.abc import Mapping, Sequence, Sized
from numbers import Integral, Real
from typing import Any

import torch
import transformers
from torch.utils.data import DataLoader
from transformers import Pipeline
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.pipelines.pt_utils import PipelineDataset, PipelineIterator
from transformers.tokenization_utils_base import TOKENIZER_CONFIG_FILE
from transformers.utils import PROCESSOR_NAME, logging

from .frozen_backbone import speed_up_frozen_backbone, warn_if_bfloat16_is_emulated
from .image_processing_hvpnet import check_image_value, decode_image
from .object_detection import ObjectCropper, object_cropper_for, text_queries
from .processing_hvpnet import HVPNetProcessor, ner_word_positions
from .tasks import GMNER, NER, RE, Task, bio_entities, task_of

logger = logging.get_logger(__name__)


class _HVPNetPipeline(Pipeline):
    """
    What the pipelines share: the processor, input checks, and batching. `preprocess` turns one input into
    `{"features": [one dict of model inputs per row], "example": ...}` (a long NER text has several rows, an empty
    one none); `_collate` pads the rows of several inputs into one batch; `_forward` runs the model once per batch
    and returns one output per input, which `postprocess` reads. Single inputs take the same path.
    """

    # `pipeline(...)` builds the processor with `AutoProcessor.from_pretrained(model, revision=..., token=...)`; when
    # it cannot (a model object without its processor), `__init__` reads it from `model.name_or_path`.
    _load_processor = None
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False
    _load_video_processor = False
    # The pipeline's task (`tasks.py`; `Pipeline.task` is the name it was built under) and the Auto class that loads
    # its models.
    hvpnet_task: Task
    auto_model_class: type
    # The keys an input dict may have.
    input_keys: tuple[str, ...]

    def __init__(self, model, processor: HVPNetProcessor | None = None, **kwargs):
        if processor is None:
            processor = _saved_processor(model.name_or_path)
        super().__init__(model=model, processor=processor, tokenizer=processor.tokenizer, **kwargs)
        self.model.eval()
        self._check_max_length(self.processor.max_length)
        crops, model_crops = self.processor.image_processor.num_object_images, self.model.config.num_object_images
        if crops > model_crops:
            raise ValueError(
                f"the processor gives {crops} object crops per example, but the model takes at most "
                f"num_object_images={model_crops}: use the processor saved with the model"
            )
        speed_up_frozen_backbone(self.model)
        if self.model.dtype == torch.bfloat16:
            warn_if_bfloat16_is_emulated(self.model.device)

    def __call__(self, inputs, *args, **kwargs):
        # transformers' `Pipeline.__call__` reads the first element of a list: an empty list gives no results.
        if isinstance(inputs, list) and not inputs:
            return []
        return super().__call__(inputs, *args, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Saves the model (which records this pipeline and copies its code) and the processor."""
        self.model.save_pretrained(save_directory, **kwargs)
        self.processor.save_pretrained(save_directory)

    def run_single(self, inputs, preprocess_params, forward_params, postprocess_params):
        model_inputs = self._collate([self.preprocess(inputs, **preprocess_params)])
        return self.postprocess(self.forward(model_inputs, **forward_params)[0], **postprocess_params)

    def get_iterator(self, inputs, num_workers, batch_size, preprocess_params, forward_params, postprocess_params):
        # As the base class does, with three differences: errors name the failing input's index; `_collate` pads
        # rows and stacks images (transformers' default collation knows neither crops nor image masks); and
        # `_forward` splits the outputs per input for every batch size (transformers' unbatching is skipped at
        # `batch_size=1` and does not split non-tensor values).
        if isinstance(inputs, Sized):
            dataset = _NumberedPipelineDataset(inputs, self._preprocess_numbered, preprocess_params)
        else:  # a generator: read in this process
            dataset = PipelineIterator(enumerate(inputs), self._preprocess_numbered, preprocess_params)
            num_workers = 0
        loader = DataLoader(dataset, num_workers=num_workers, batch_size=batch_size, collate_fn=self._collate)
        return (
            self.postprocess(output, **postprocess_params)
            for batch in loader
            for output in self.forward(batch, **forward_params)
        )

    def _preprocess_numbered(self, numbered_input: tuple[int, Any], **preprocess_params) -> dict[str, Any]:
        index, inputs = numbered_input
        try:
            return self.preprocess(inputs, **preprocess_params)
        except (ValueError, TypeError, OSError) as error:
            error_class = next(base for base in (ValueError, TypeError, OSError) if isinstance(error, base))
            raise error_class(f"input {index}: {error}") from error

    def _collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Pads the rows of all `items` into one batch of model inputs, with `examples` and `num_rows` per item."""
        rows = [features for item in items for features in item["features"]]
        batch: dict[str, Any] = dict(self.processor.pad(rows)) if rows else {}
        batch["examples"] = [item["example"] for item in items]
        batch["num_rows"] = [len(item["features"]) for item in items]
        return batch

    def _forward(self, model_inputs: dict[str, Any]) -> list[dict[str, Any]]:
        examples, num_rows = model_inputs.pop("examples"), model_inputs.pop("num_rows")
        row_outputs = self._row_outputs(self.model(**model_inputs), model_inputs) if sum(num_rows) else {}
        outputs, first = [], 0
        for example, count in zip(examples, num_rows, strict=True):
            rows = {name: value[first : first + count] for name, value in row_outputs.items()}
            outputs.append({"example": example, **rows})
            first += count
        return outputs

    def _row_outputs(self, model_outputs, model_inputs: dict[str, Any]) -> dict[str, Any]:
        """What `postprocess` reads of the model outputs, one entry per row."""
        raise NotImplementedError

    def _check_input(self, inputs: Any) -> Mapping:
        """`inputs` if it is a dict of known keys with well-typed words and crops, else an error naming the key."""
        if not isinstance(inputs, Mapping):
            raise TypeError(f"an input must be a dict with keys {list(self.input_keys)}, got {type(inputs).__name__}")
        unknown = [key for key in inputs if key not in self.input_keys]
        if unknown:
            raise ValueError(f"unknown input keys {unknown}; accepted keys are {list(self.input_keys)}")
        if "words" in inputs:
            words = inputs["words"]
            if isinstance(words, str) or not isinstance(words, Sequence):
                hint = " (give a string as 'text')" if "text" in self.input_keys else ""
                raise TypeError(f"'words' must be a list of strings, got {type(words).__name__}{hint}")
            for position, word in enumerate(words):
                if not isinstance(word, str):
                    raise TypeError(f"'words'[{position}] must be a string, got {type(word).__name__}")
        objects = inputs.get("objects")
        if objects is not None and (isinstance(objects, str) or not isinstance(objects, Sequence)):
            raise TypeError(f"'objects' must be a list of images or paths, got {type(objects).__name__}")
        image = inputs.get("image")
        if isinstance(image, (list, tuple)):  # several images: the global one first (`image_slots`)
            images = {f"'image'[{position}]": picture for position, picture in enumerate(image)}
        else:
            images = {"'image'": image}
        images.update({f"'objects'[{position}]": crop for position, crop in enumerate(objects or [])})
        for name, image in images.items():
            check_image_value(image, name)
        return inputs

    def _check_max_length(self, max_length: Any) -> None:
        positions = self.model.config.text_config.max_position_embeddings
        limit = self.model.base_model.max_text_length
        if isinstance(max_length, bool) or not isinstance(max_length, int) or not 3 <= max_length <= limit:
            skipped = f" less the {positions - limit} its embeddings skip: {limit}" if limit < positions else ""
            raise ValueError(
                f"max_length must be an integer from 3 to the text model's max_position_embeddings ({positions}"
                f"{skipped}), got {max_length!r}"
            )

    def _preprocess_parameters(self, max_length: int | None, missing_images: str | None) -> dict[str, Any]:
        if max_length is not None:
            self._check_max_length(max_length)
        parameters = {"max_length": max_length, "missing_images": missing_images}
        return {name: value for name, value in parameters.items() if value is not None}

    def _object_parameters(self, objects: str | ObjectCropper | None, detector) -> dict[str, ObjectCropper]:
        """`objects="detect"` (with `detector=`) or an `ObjectCropper`: crops found for inputs that have none."""
        if objects is None:
            return {}
        current = getattr(self, "_object_cropper", None)
        self._object_cropper = object_cropper_for(
            objects, detector, self.processor.image_processor.num_object_images, current
        )
        return {"object_cropper": self._object_cropper}

    def _image_features(
        self,
        words: list[str],
        example: Mapping,
        missing_images: str,
        object_cropper: ObjectCropper | None = None,
        head: Mapping | None = None,
        tail: Mapping | None = None,
    ) -> dict[str, torch.Tensor]:
        """The image tensors of one input (no batch dimension), with crops from `object_cropper` if it has none (of
        its global image, the first where it has several)."""
        image, objects = example.get("image"), example.get("objects") or []
        if object_cropper is not None and not objects:
            global_image = (image or [None])[0] if isinstance(image, (list, tuple)) else image
            objects = object_cropper.crops_for_text(global_image, words, head, tail)
        return self.processor.image_processor.preprocess_example(image, objects, missing_images)


class MultimodalNerPipeline(_HVPNetPipeline):
    """
    Named entities of a text and its image.

    Input: a string (text only), or a dict with `"text"` (a string, split on whitespace) or `"words"` (a list of
    words), and optionally `"image"` and `"objects"` (object crops). Output per example: a list of entities
    `{"entity_group", "score", "word", "word_start", "word_end", "start", "end"}` with the word span
    `[word_start, word_end)` and, when text was given, the character span `[start, end)`. The CRF's tags decide the
    entities; `score` is the mean probability the emission layer gives the tags of the entity's words (the CRF's
    transition scores are not in it). A text without words gives `[]`.

    Every word is tagged: a text longer than `max_length` tokens is read in the tokenizer's overlapping rows (each
    next row repeats the last `stride` tokens of the previous one, by default half a row), and each word takes its
    tag from the row where it is farthest from a cut.
    """

    hvpnet_task = NER
    auto_model_class = getattr(transformers, NER.auto_model_class)
    input_keys = ("text", "words", "image", "objects")

    def _sanitize_parameters(
        self,
        max_length: int | None = None,
        stride: int | None = None,
        missing_images: str | None = None,
        objects=None,
        detector=None,
        **kwargs,
    ):
        preprocess = {
            **self._preprocess_parameters(max_length, missing_images),
            **self._object_parameters(objects, detector),
        }
        if stride is not None:
            if isinstance(stride, bool) or not isinstance(stride, Integral):
                raise ValueError(f"stride must be an integer, got {stride!r}")
            preprocess["stride"] = int(stride)
        return preprocess, {}, {}

    def preprocess(
        self,
        inputs: str | Mapping,
        max_length: int | None = None,
        stride: int | None = None,
        missing_images: str = "error",
        object_cropper: ObjectCropper | None = None,
    ) -> dict[str, Any]:
        example = self._check_input({"text": inputs} if isinstance(inputs, str) else inputs)
        words, offsets = self._words(example)
        info = {"words": words, "offsets": offsets, "word_ids": [], "word_start_mask": []}
        if not words:
            return {"features": [], "example": info}
        rows = self.processor.encode_ner([words], max_length=max_length, stride=stride, return_overflowing_tokens=True)
        images = self._image_features(words, example, missing_images, object_cropper)
        info["word_ids"], info["word_start_mask"] = rows["word_ids"], rows["word_start_mask"]
        row_names = ("input_ids", "attention_mask", "token_type_ids", "word_start_mask")
        features = [
            {**{name: rows[name][row] for name in row_names if name in rows}, **images}
            for row in range(len(rows["input_ids"]))
        ]
        return {"features": features, "example": info}

    def _words(self, example: Mapping) -> tuple[list[str], list[tuple[int, int]] | None]:
        """The words of a checked input and, when it gave `"text"`, their character spans."""
        if "words" in example and "text" in example:
            raise ValueError(f"a {self.hvpnet_task.pipeline_task} input takes 'text' or 'words', not both")
        if "words" in example:
            return list(example["words"]), None
        if "text" in example:
            if not isinstance(example["text"], str):
                raise TypeError(f"'text' must be a string, got {type(example['text']).__name__}")
            return split_words(example["text"])
        raise ValueError(
            f"a {self.hvpnet_task.pipeline_task} input needs 'text' or 'words', got keys {sorted(example)}"
        )

    def _row_outputs(self, model_outputs, model_inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        tags = self.model.decode(model_outputs.logits, model_inputs["word_start_mask"])
        # In float32 also for a bfloat16 model, as transformers' pipelines read logits.
        probabilities = model_outputs.logits.float().softmax(dim=-1).gather(-1, tags.clamp(min=0)[..., None])[..., 0]
        return {"predicted_tags": tags, "tag_probabilities": probabilities}

    def postprocess(self, model_outputs: dict[str, Any]) -> list[dict[str, Any]]:
        example = model_outputs["example"]
        words, offsets = example["words"], example["offsets"]
        if not words:
            return []
        # Every word has a position: the rows cover the whole text.
        positions = ner_word_positions(example["word_ids"], len(words), example["word_start_mask"])
        tags, probabilities = model_outputs["predicted_tags"].tolist(), model_outputs["tag_probabilities"].tolist()
        word_tags = [self.model.config.id2label[tags[row][token]] for row, token in positions]
        word_probabilities = [probabilities[row][token] for row, token in positions]
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
    with `top_k=k` the k most probable relations as a list, best first. A sentence longer than `max_length` tokens
    keeps the tokens nearest the entity markers (see `HVPNetProcessor.encode_re`).
    """

    hvpnet_task = RE
    auto_model_class = getattr(transformers, RE.auto_model_class)
    input_keys = ("words", "head", "tail", "image", "objects")

    def _sanitize_parameters(
        self,
        top_k: int | None = None,
        max_length: int | None = None,
        missing_images: str | None = None,
        objects=None,
        detector=None,
        **kwargs,
    ):
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, Integral) or top_k < 1):
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
        postprocess = {"top_k": int(top_k)} if top_k is not None else {}
        preprocess = {
            **self._preprocess_parameters(max_length, missing_images),
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
        inputs = self._check_input(inputs)
        missing = [key for key in ("words", "head", "tail") if key not in inputs]
        if missing:
            raise ValueError(f"a multimodal-re input needs 'words', 'head' and 'tail'; missing {missing}")
        words = list(inputs["words"])
        spans = {role: _span(inputs[role], role, len(words)) for role in ("head", "tail")}
        encoded = self.processor.encode_re([words], [spans["head"]], [spans["tail"]], max_length=max_length)
        features = {name: values[0] for name, values in encoded.items()}
        features.update(self._image_features(words, inputs, missing_images, object_cropper, **spans))
        return {"features": [features], "example": None}

    def _row_outputs(self, model_outputs, model_inputs: dict[str, Any]) -> dict[str, list]:
        return {"relations": self.model.decode(model_outputs.logits)}  # every relation, best first

    def postprocess(self, model_outputs: dict[str, Any], top_k: int | None = None) -> dict | list[dict]:
        ranked = model_outputs["relations"][0]
        return ranked[:top_k] if top_k is not None else ranked[0]


class MultimodalGroundedNerPipeline(MultimodalNerPipeline):
    """
    Named entities of a text and their regions in its image (grounded multimodal NER).

    Input: as for `multimodal-ner`, with one `"image"` and its candidate regions: `"objects"` (crops) with `"boxes"`
    (one `[xmin, ymin, xmax, ymax]` per crop, in the image's pixels), `"boxes"` alone (the pipeline cuts the crops
    from the image), or for an input without either, `objects="detect"` (with `detector=`) or an `ObjectCropper`
    (the crops it finds, with their boxes). The first `num_object_images` candidates are read. Output per example:
    the entities of `multimodal-ner`, each with `box`, the box of its region in pixels of the (upright) input image,
    or None when the model places it in none of the candidates, and `region_score`, the probability of that choice.
    """

    hvpnet_task = GMNER
    auto_model_class = getattr(transformers, GMNER.auto_model_class)
    input_keys = ("text", "words", "image", "objects", "boxes")

    def preprocess(
        self, inputs: str | Mapping, object_cropper: ObjectCropper | None = None, **text_parameters
    ) -> dict[str, Any]:
        """The inputs of `multimodal-ner` for the text and the candidate crops; `text_parameters` are its own
        (`max_length`, `stride`, `missing_images`)."""
        example = self._check_input({"text": inputs} if isinstance(inputs, str) else inputs)
        if isinstance(example.get("image"), (list, tuple)):
            raise ValueError(
                f"a {self.hvpnet_task.pipeline_task} input takes one 'image': its candidates are boxes in it"
            )
        crops, boxes = self._candidates(example, object_cropper)
        text_example = {key: value for key, value in example.items() if key != "boxes"}
        processed = super().preprocess({**text_example, "objects": crops}, **text_parameters)
        processed["example"]["boxes"] = boxes
        return processed

    def _candidates(self, example: Mapping, object_cropper: ObjectCropper | None) -> tuple[list, list[list[float]]]:
        """The candidate crops of an input and their boxes: given, cut from the image at the given boxes, or found by
        `object_cropper` (none when the image is absent or unreadable: the `missing_images` policy then applies)."""
        image, objects, boxes = example.get("image"), list(example.get("objects") or []), example.get("boxes")
        if boxes is None:
            if objects:
                raise ValueError("'objects' need their 'boxes' (one [xmin, ymin, xmax, ymax] per crop) to be grounded")
            if object_cropper is None:
                return [], []
        else:
            boxes = [_box(box, f"'boxes'[{position}]") for position, box in enumerate(boxes)]
            if objects:
                if len(objects) != len(boxes):
                    raise ValueError(f"'objects' has {len(objects)} crops but 'boxes' has {len(boxes)} boxes")
                return objects, boxes
            if image is None:
                raise ValueError("'boxes' without 'objects' are cut from the 'image', which is missing")
        try:
            picture = decode_image(image)
        except OSError as error:
            logger.warning("%s; no candidates for it.", error)
            return [], []
        if picture is None or 0 in picture.size:
            return [], []
        if boxes is None:
            words, _ = self._words(example)
            boxes = [list(found.box) for found in object_cropper.detect(picture, text_queries(words))]
        return [picture.crop(tuple(box)) for box in boxes], boxes

    def _row_outputs(self, model_outputs, model_inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {
            **super()._row_outputs(model_outputs, model_inputs),
            "last_hidden_state": model_outputs.last_hidden_state,
            "word_start_mask": model_inputs["word_start_mask"],
            "candidate_embeddings": model_outputs.candidate_embeddings,
            "candidate_mask": model_outputs.candidate_mask,
        }

    def postprocess(self, model_outputs: dict[str, Any]) -> list[dict[str, Any]]:
        entities = super().postprocess(model_outputs)
        example = model_outputs["example"]
        positions = ner_word_positions(example["word_ids"], len(example["words"]), example["word_start_mask"])
        boxes = example["boxes"]
        for entity in entities:
            # The entity is grounded in the row that reads its first word best, on its words in that row.
            row = positions[entity["word_start"]][0]
            row_starts = zip(example["word_ids"][row], example["word_start_mask"][row], strict=True)
            row_words = [word for word, start in row_starts if start]
            start = row_words.index(entity["word_start"])
            end = start + sum(1 for word in row_words[start:] if word < entity["word_end"])
            with torch.no_grad():
                logits = self.model.score_regions(
                    *(model_outputs[name][row : row + 1] for name in ("last_hidden_state", "word_start_mask")),
                    torch.tensor([[[start, end]]], device=model_outputs["last_hidden_state"].device),
                    *(model_outputs[name][row : row + 1] for name in ("candidate_embeddings", "candidate_mask")),
                )[0, 0]
            score, choice = logits.float().softmax(dim=-1).max(dim=-1)
            entity["box"] = boxes[int(choice)] if int(choice) < len(logits) - 1 else None
            entity["region_score"] = float(score)
        return entities


# The pipeline of each task, by its name in `tasks.TASKS`; its `auto_model_class` loads its models.
PIPELINE_FOR_TASK = {
    pipeline_class.hvpnet_task.name: pipeline_class
    for pipeline_class in (MultimodalNerPipeline, MultimodalRePipeline, MultimodalGroundedNerPipeline)
}


def split_words(text: str) -> tuple[list[str], list[tuple[int, int]]]:
    """The whitespace-separated words of `text` and their character spans `[start, end)`: how the NER pipeline reads
    a text."""
    matches = list(re.finditer(r"\S+", text))
    return [match.group() for match in matches], [match.span() for match in matches]


class _NumberedPipelineDataset(PipelineDataset):
    """A `PipelineDataset` that hands `process` each input with its index."""

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.process((index, self.dataset[index]), **self.params)


def _saved_processor(model_name: str) -> HVPNetProcessor:
    """
    The processor saved with the model `model_name` (a folder or Hub id); a folder without it is an error naming
    the missing files, before the tokenizer's own error for them (which suggests installing libraries).
    """
    if not model_name:
        raise ValueError("this model was not loaded from a folder or the Hub: pass its processor (processor=...)")
    if os.path.isdir(model_name):
        missing = [
            name
            for name in (PROCESSOR_NAME, TOKENIZER_CONFIG_FILE)
            if not os.path.isfile(os.path.join(model_name, name))
        ]
        if missing:
            raise ValueError(
                f"{model_name} holds no HVPNeT processor (missing {', '.join(missing)}): save it with the model, "
                f"processor.save_pretrained({model_name!r})"
            )
    return HVPNetProcessor.from_pretrained(model_name)


def _box(box: Any, name: str) -> list[float]:
    """A candidate box `[xmin, ymin, xmax, ymax]` in pixels, checked: four numbers with xmin < xmax, ymin < ymax."""
    numbers = isinstance(box, Sequence) and not isinstance(box, str) and len(box) == 4
    if not numbers or not all(isinstance(value, Real) and not isinstance(value, bool) for value in box):
        raise ValueError(f"{name} must be [xmin, ymin, xmax, ymax] (four numbers, in pixels), got {box!r}")
    if not (box[0] < box[2] and box[1] < box[3]):
        raise ValueError(f"{name} = {list(box)} is empty: a box needs xmin < xmax and ymin < ymax")
    return list(box)


def _span(span: Sequence[int] | Mapping, role: str, num_words: int) -> dict[str, int]:
    """A `(start, end)` or `{"start", "end"}` word span, checked against the sentence length."""
    try:
        start, end = (span["start"], span["end"]) if isinstance(span, Mapping) else span
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{role} must be a (start, end) pair or {{'start', 'end'}}, got {span!r}") from error
    if not all(isinstance(bound, Integral) and not isinstance(bound, bool) for bound in (start, end)):
        raise TypeError(f"{role} span bounds must be integers, got {span!r}")
    if not 0 <= start < end <= num_words:
        raise ValueError(f"{role} span [{start}, {end}) is not a word span of the {num_words}-word input")
    return {"start": int(start), "end": int(end)}


# The package's pipelines own the task names. A copy of this file loaded from a model folder's code (a module of
# `transformers_modules`) registers them only where they are not registered yet, so that loading a saved pipeline
# never replaces the package's classes in a process that imported `hvpnet_hf`.
def _register_tasks() -> None:
    for pipeline_class in PIPELINE_FOR_TASK.values():
        task_name = pipeline_class.hvpnet_task.pipeline_task
        if __name__.startswith("hvpnet_hf.") or task_name not in PIPELINE_REGISTRY.get_supported_tasks():
            PIPELINE_REGISTRY.register_pipeline(
                task_name, pipeline_class=pipeline_class, pt_model=pipeline_class.auto_model_class, type="multimodal"
            )


_register_tasks()


__all__ = [
    "PIPELINE_FOR_TASK",
    "MultimodalGroundedNerPipeline",
    "MultimodalNerPipeline",
    "MultimodalRePipeline",
    "bio_entities",
    "split_words",
    "task_of",
]
