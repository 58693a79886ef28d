"""
Object crops for images that come without them, found by a transformers detection pipeline.

HVPNeT reads up to `num_object_images` crops of the objects in an image next to the whole image. The published data
sets ship crops made by a visual grounding model queried with the noun phrases of each text; for new images
`ObjectCropper` finds them with either

- a zero-shot detector (`zero-shot-object-detection`: OWL-ViT, OWLv2, Grounding DINO, ...), queried with phrases of
  the text (`text_queries`), or
- a closed-vocabulary detector (`object-detection`: DETR, RT-DETR, ...), whose best boxes are taken whatever their
  class.

Boxes are clipped to the image, boxes smaller than `min_size` pixels on a side or scoring below `threshold` are
dropped, a box overlapping an already kept one by more than `max_overlap` (IoU) is dropped, and the rest are ordered
by score (highest first; ties by box coordinates, then label), so the same image and queries always give the same
crops. An image where nothing is found gives no crops (its object slots are masked by the model).

Images are read and converted as the image processor reads them (`load_image`, `to_rgb_image`: RGB, upright by
their EXIF orientation), so the boxes are cut from the picture the model sees as the global image. An image longer
than `DETECTION_MAX_SIDE` pixels on a side is given to the detector scaled down, so that no shape of image (a strip
of 40000 x 1 pixels, which a detector padding to a square would make 40000 x 40000) grows its memory without bound;
an image without pixels gets no crops.

This module imports only torch, torchvision, numpy, PIL, transformers and the image processing module, so the
pipelines can use it as remote code.
"""

import logging
import os
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.ops import box_iou
from transformers import AutoConfig, Pipeline, ZeroShotObjectDetectionPipeline, pipeline
from transformers.models.auto.modeling_auto import MODEL_FOR_ZERO_SHOT_OBJECT_DETECTION_MAPPING_NAMES

from .image_processing_hvpnet import ImageValue, decode_image, to_rgb_image

logger = logging.getLogger(__name__)

DEFAULT_DETECTOR = "google/owlv2-base-patch16-ensemble"
# Categories a detector can ground whatever the text names: the people, places, organizations (through their logos)
# and things that the entities of tweets and MNRE sentences mostly are.
GENERIC_QUERIES = ("a person", "a building", "a logo", "an animal", "a vehicle")
MAX_TEXT_QUERIES = 6
# The longest side of the image a detector is given: larger images are scaled down for detection (their boxes scaled
# back), so a detector that pads images to a square (OWLv2) needs at most this squared whatever the image's shape.
# 12-megapixel photos (4032 x 3024) are given as they are; the detectors above read images at 1333 pixels or less.
DETECTION_MAX_SIDE = 4096
# Capitalized words that name nothing: sentence-initial function words and Twitter markers.
STOP_WORDS = frozenset(
    "a an and are as at be but by for from he her his i if in is it its me my no not of on or our rt she so that the "
    "their them they this to via was we what when where who why will with you your".split()
)
_EDGE_PUNCTUATION = string.punctuation.replace("#", "").replace("@", "") + "“”‘’…"


def text_queries(
    words: Sequence[str], mentions: Sequence[str] = (), max_text_queries: int = MAX_TEXT_QUERIES
) -> list[str]:
    """
    Detector queries for one text: the `mentions` given (MNRE's head and tail), then the text's candidate entity
    phrases -- runs of capitalized words, hashtags and @handles (without `#`/`@`, `_` read as a space), leaving out
    stop words, links and numbers -- up to `max_text_queries` text queries in all, then `GENERIC_QUERIES`. Duplicates
    (ignoring case) are dropped; the order is that of the text.
    """
    phrases = [mention.strip() for mention in mentions]
    run: list[str] = []
    for raw_word in words:
        word = raw_word.strip(_EDGE_PUNCTUATION)
        if word[:1] in ("#", "@") and len(word) > 1:
            phrases += [" ".join(run), word[1:].replace("_", " ")]
            run = []
        elif word[:1].isupper() and word.lower() not in STOP_WORDS and not word.lower().startswith("http"):
            run.append(word)
        else:
            phrases.append(" ".join(run))
            run = []
    phrases.append(" ".join(run))
    queries: list[str] = []
    for phrase in phrases:
        if phrase and phrase.lower() not in {query.lower() for query in queries}:
            queries.append(phrase)
    return queries[:max_text_queries] + [
        query for query in GENERIC_QUERIES if query.lower() not in map(str.lower, queries)
    ]


@dataclass(frozen=True)
class DetectedObject:
    """One detected object: its score, its box `(xmin, ymin, xmax, ymax)` in pixels (clipped), and its label."""

    score: float
    box: tuple[int, int, int, int]
    label: str


def detection_task(detector: str | os.PathLike) -> str:
    """`"zero-shot-object-detection"` or `"object-detection"`, from the detector's configuration."""
    model_type = AutoConfig.from_pretrained(detector).model_type
    if model_type in MODEL_FOR_ZERO_SHOT_OBJECT_DETECTION_MAPPING_NAMES:
        return "zero-shot-object-detection"
    return "object-detection"


class ObjectCropper:
    """
    Finds up to `num_objects` objects in an image with a transformers detection pipeline and cuts them out.

    Args:
        detector: a `zero-shot-object-detection` or `object-detection` pipeline, or a Hub id or local folder of a
            detection model (its pipeline is built with `device`).
        num_objects: the most crops returned per image.
        threshold: the lowest detector score kept.
        min_size: the smallest box side kept (at least 1), in pixels of the original image, after clipping.
        max_overlap: a box whose IoU with a better-scored kept box exceeds this is dropped as a duplicate.
    """

    def __init__(
        self,
        detector: str | os.PathLike | Pipeline = DEFAULT_DETECTOR,
        num_objects: int = 3,
        threshold: float = 0.1,
        min_size: int = 16,
        max_overlap: float = 0.5,
        device: str | int | None = None,
    ):
        if min_size < 1:
            raise ValueError(f"min_size must be at least 1 pixel, got {min_size}")
        if not isinstance(detector, Pipeline):
            detector = pipeline(detection_task(detector), model=str(detector), device=device)
        self.detector = detector
        self.zero_shot = isinstance(detector, ZeroShotObjectDetectionPipeline)
        self.num_objects = num_objects
        self.threshold = threshold
        self.min_size = min_size
        self.max_overlap = max_overlap

    @property
    def settings(self) -> dict:
        """What decides the crops: the detector's name and the selection settings."""
        return {
            "detector": self.detector.model.name_or_path,
            "num_objects": self.num_objects,
            "threshold": self.threshold,
            "min_size": self.min_size,
            "max_overlap": self.max_overlap,
        }

    def detect(self, image: Image.Image, queries: Sequence[str] = ()) -> list[DetectedObject]:
        """
        The kept objects of `image`, best first; `queries` are needed by (and only used for) zero-shot detectors. An
        image longer than `DETECTION_MAX_SIDE` on a side is detected in scaled down; its boxes are in its own pixels.
        """
        if self.zero_shot and not queries:
            raise ValueError("a zero-shot detector needs at least one query")
        scale = min(1.0, DETECTION_MAX_SIDE / max(image.size))
        seen = image
        if scale < 1:
            seen = image.resize(
                (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.BICUBIC
            )
        if self.zero_shot:
            found = self.detector(seen, candidate_labels=list(queries), threshold=self.threshold)
        else:
            found = self.detector(seen, threshold=self.threshold)
        to_image = {"x": image.width / seen.width, "y": image.height / seen.height}
        candidates = []
        for item in found:
            box = {key: value * to_image[key[0]] for key, value in item["box"].items()}
            box = _clip(box, image.width, image.height)
            large_enough = min(box[2] - box[0], box[3] - box[1]) >= self.min_size
            if large_enough and item["score"] >= self.threshold:
                candidates.append(DetectedObject(float(item["score"]), box, str(item["label"])))
        candidates.sort(key=lambda candidate: (-candidate.score, candidate.box, candidate.label))
        return self._without_duplicates(candidates)

    def crops(self, image: Image.Image | np.ndarray, queries: Sequence[str] = ()) -> list[Image.Image]:
        """
        Up to `num_objects` RGB crops of `image` (made upright and RGB by `to_rgb_image` first), best first; none for
        an image without pixels (what happens to it is the processor's `missing_images` policy).
        """
        image = to_rgb_image(image)
        if 0 in image.size:
            return []
        return [image.crop(found.box) for found in self.detect(image, queries)]

    def crops_for_text(
        self, image: ImageValue, words: Sequence[str], head: Mapping | None = None, tail: Mapping | None = None
    ) -> list[Image.Image]:
        """
        The crops of one example's image (any image value: an image, an array, a path or a `datasets.Image()` value),
        queried with `text_queries` of its words (and of its head and tail word spans `{"start", "end"}` for relation
        extraction). No image, or a file or bytes that `load_image` cannot read (it is logged), gives no crops: what
        happens to such an image is the processor's `missing_images` policy.
        """
        try:
            image = decode_image(image)
        except OSError as error:
            logger.warning("%s; no crops for it.", error)
            return []
        if image is None:
            return []
        mentions = [" ".join(words[span["start"] : span["end"]]) for span in (head, tail) if span is not None]
        return self.crops(image, text_queries(words, mentions))

    def _without_duplicates(self, candidates: list[DetectedObject]) -> list[DetectedObject]:
        if not candidates:
            return []
        overlaps = box_iou(*[torch.tensor([found.box for found in candidates], dtype=torch.float)] * 2)
        kept: list[int] = []
        for index in range(len(candidates)):
            if all(overlaps[index, other] <= self.max_overlap for other in kept):
                kept.append(index)
                if len(kept) == self.num_objects:
                    break
        return [candidates[index] for index in kept]


def object_cropper_for(
    objects: "str | ObjectCropper",
    detector: str | os.PathLike | Pipeline | None,
    num_objects: int,
    current: ObjectCropper | None = None,
) -> ObjectCropper:
    """
    The cropper of the pipelines' `objects=` setting: an `ObjectCropper` as given, or for `"detect"` one built from
    `detector` (default `DEFAULT_DETECTOR`) that keeps `num_objects` crops -- `current` when it already uses it.
    """
    if isinstance(objects, ObjectCropper):
        return objects
    if objects != "detect":
        raise ValueError(f"objects must be 'detect' or an ObjectCropper, got {objects!r}")
    detector = detector if detector is not None else DEFAULT_DETECTOR
    if current is not None and (current.detector is detector or current.settings["detector"] == str(detector)):
        return current
    return ObjectCropper(detector, num_objects=num_objects)


def _clip(box: Mapping[str, float], width: int, height: int) -> tuple[int, int, int, int]:
    """`box` (`xmin`, `ymin`, `xmax`, `ymax`) as whole pixels inside a `width` x `height` image."""
    xmin, xmax = (min(max(round(box[key]), 0), width) for key in ("xmin", "xmax"))
    ymin, ymax = (min(max(round(box[key]), 0), height) for key in ("ymin", "ymax"))
    return xmin, ymin, xmax, ymax


__all__ = [
    "DEFAULT_DETECTOR",
    "DETECTION_MAX_SIDE",
    "GENERIC_QUERIES",
    "DetectedObject",
    "ObjectCropper",
    "text_queries",
]
