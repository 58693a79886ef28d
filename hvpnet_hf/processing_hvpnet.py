"""
Processor for HVPNeT: a BERT tokenizer plus the image transform of the vision backbone.

`HVPNetProcessor` is a small class rather than a `transformers.ProcessorMixin` subclass: the mixin expects its image
part to be a `BaseImageProcessor` found through transformers' Auto registries, while the transform here is timm's
evaluation transform for the backbone (resize, center-crop, normalise). Wrapping it in a registered image-processor
class would add a second class whose only job is to satisfy the mixin. `save_pretrained` writes the tokenizer files
plus `processor_config.json` with the image settings; `from_pretrained` reads both back.
"""

import functools
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import ExifTags, Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform, resolve_data_config
from transformers import AutoTokenizer, BatchEncoding, BatchFeature, PreTrainedTokenizerBase

from .collating import HVPNetDataCollator
from .loading import MNER_LABELS, load_image

TASKS = ("ner", "re")
# Entity markers of the relation task: `<s> head </s>`, `<o> tail </o>`.
HEAD_START, HEAD_END, TAIL_START, TAIL_END = "<s>", "</s>", "<o>", "</o>"
ENTITY_MARKERS = [HEAD_START, HEAD_END, TAIL_START, TAIL_END]
PROCESSOR_CONFIG_NAME = "processor_config.json"
DEFAULT_IMAGE_SIZE = 224
# PIL modes of 16-bit grayscale images (PNG, TIFF). The 32-bit mode "I" has no fixed range and keeps PIL's conversion.
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N")

logger = logging.getLogger(__name__)


class HVPNetProcessor:
    r"""
    Turns words (NER), or words with a head and a tail span (RE), plus a global image and object crops into the
    inputs of the HVPNeT models.

    For `task="re"` the processor adds the entity markers `<s> </s> <o> </o>` to the tokenizer as special tokens
    when it is built (if they are not there already); the model's embeddings must then be resized to
    `len(processor.tokenizer)`, which `from_text_vision_pretrained(..., tokenizer=processor.tokenizer)` does.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): a BERT-style tokenizer (`[CLS] ... [SEP]`).
        task (`str`): `"ner"` or `"re"`.
        image_size (`int`): side of the square image after the center crop.
        crop_pct (`float`): images are first resized so their short side is `image_size / crop_pct`.
        crop_mode (`str`): `"center"` keeps the aspect ratio and takes the central square; `"squash"` resizes
            straight to `image_size x image_size` (what the authors' original code does).
        image_mean, image_std (`Sequence[float]`): normalisation per RGB channel.
        interpolation (`str`): resize interpolation (`"bilinear"`, `"bicubic"`, ...).
        num_object_images (`int`): object-crop slots per example; fewer crops are padded with zeros and masked.
        max_length (`int`): maximum token count, special tokens and entity markers included.
    """

    # What Trainer's length grouping and pipelines read to know the model inputs.
    model_input_names = [
        "input_ids",
        "attention_mask",
        "token_type_ids",
        "pixel_values",
        "object_pixel_values",
        "image_mask",
        "object_mask",
    ]

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        task: str = "ner",
        image_size: int = DEFAULT_IMAGE_SIZE,
        crop_pct: float = 0.875,
        crop_mode: str = "center",
        image_mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        image_std: Sequence[float] = IMAGENET_DEFAULT_STD,
        interpolation: str = "bicubic",
        num_object_images: int = 3,
        max_length: int = 128,
    ):
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if task == "re":
            _check_re_max_length(max_length)
        self.tokenizer = tokenizer
        self.task = task
        self.image_size = image_size
        self.crop_pct = crop_pct
        self.crop_mode = crop_mode
        self.image_mean = tuple(image_mean)
        self.image_std = tuple(image_std)
        self.interpolation = interpolation
        self.num_object_images = num_object_images
        self.max_length = max_length
        if task == "re":
            missing = [marker for marker in ENTITY_MARKERS if marker not in tokenizer.get_vocab()]
            if missing:
                tokenizer.add_special_tokens(
                    {"additional_special_tokens": missing}, replace_extra_special_tokens=False
                )
        self.image_transform = create_transform(
            input_size=(3, image_size, image_size),
            crop_pct=crop_pct,
            crop_mode=crop_mode,
            mean=self.image_mean,
            std=self.image_std,
            interpolation=interpolation,
        )

    @classmethod
    def from_backbone(
        cls,
        tokenizer: PreTrainedTokenizerBase | str | os.PathLike,
        vision_backbone: str = "resnet50",
        task: str = "ner",
        image_size: int | None = None,
        **kwargs,
    ) -> "HVPNetProcessor":
        """
        Builds a processor whose image transform follows the timm pretrained config of `vision_backbone` (read from
        timm's registry, nothing is downloaded); `image_size` overrides the crop size. Backbones without a
        pretrained config get ImageNet statistics and 224 pixels.
        """
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        pretrained_cfg = timm.get_pretrained_cfg(vision_backbone)
        settings = {}
        if pretrained_cfg is not None:
            data_config = resolve_data_config({}, pretrained_cfg=pretrained_cfg.to_dict())
            settings = {
                "image_size": data_config["input_size"][-1],
                "crop_pct": data_config["crop_pct"],
                "image_mean": data_config["mean"],
                "image_std": data_config["std"],
                "interpolation": data_config["interpolation"],
            }
        if image_size is not None:
            settings["image_size"] = image_size
        return cls(tokenizer, task=task, **{**settings, **kwargs})

    @property
    def head_start_token_id(self) -> int:
        """Id of `<s>`, for `HVPNetConfig.head_start_token_id`."""
        return self.tokenizer.convert_tokens_to_ids(HEAD_START)

    @property
    def tail_start_token_id(self) -> int:
        """Id of `<o>`, for `HVPNetConfig.tail_start_token_id`."""
        return self.tokenizer.convert_tokens_to_ids(TAIL_START)

    def __call__(
        self,
        words: Sequence[str] | Sequence[Sequence[str]],
        image: "Image.Image | str | None | Sequence[Image.Image | str | None]" = None,
        objects: Sequence | None = None,
        *,
        tags: Sequence[int] | Sequence[Sequence[int]] | None = None,
        head: Mapping | Sequence[Mapping] | None = None,
        tail: Mapping | Sequence[Mapping] | None = None,
        relation: int | Sequence[int] | None = None,
        max_length: int | None = None,
        missing_images: str = "mask",
    ) -> BatchFeature:
        """
        Encodes one example (`words` is a list of strings) or a batch (a list of word lists; the other arguments
        are then lists too) into padded tensors named like the model inputs: `input_ids`, `attention_mask`,
        `token_type_ids` (B, T), `pixel_values` (B, 3, S, S), `object_pixel_values` (B, k, 3, S, S), `image_mask`
        (B,), `object_mask` (B, k), plus `word_start_mask` (B, T) for NER and `labels` when `tags` (NER, tag ids
        per word) or `relation` (RE, a relation id) is given. RE needs `head` and `tail` as
        `{"start": int, "end": int}` word spans (end exclusive).
        """
        single = isinstance(words[0], str) if len(words) else True
        if single:
            words, image, objects = [words], [image], [objects]
            tags, head, tail = [tags] if tags is not None else None, [head], [tail]
            relation = [relation] if relation is not None else None
        if self.task == "ner":
            encoded = self.encode_ner(words, tags, max_length)
        else:
            encoded = self.encode_re(words, head, tail, relation, max_length)
        images = image if image is not None else [None] * len(words)
        objects = objects if objects is not None else [None] * len(words)
        features = []
        for index in range(len(words)):
            feature = {name: values[index] for name, values in encoded.items()}
            feature.update(self.preprocess_images(images[index], objects[index], missing_images))
            features.append(feature)
        return BatchFeature(HVPNetDataCollator(self)(features))

    def encode_ner(
        self,
        words: Sequence[Sequence[str]],
        tags: Sequence[Sequence[int]] | None = None,
        max_length: int | None = None,
    ) -> dict[str, list]:
        """
        Tokenises a batch of word lists. Returns lists (one per example) of `input_ids`, `attention_mask`,
        `token_type_ids`, `word_start_mask` (True at the first sub-word of each word), `word_ids` (word index per
        token, -1 for special tokens) and, with `tags`, `labels` (the word's tag id at its first sub-word, -100
        elsewhere).

        A word that tokenises to nothing (control characters, some symbols) is replaced by the unknown token, so
        every word keeps one first sub-word. Words after the `max_length` cut have no token: `post_process_ner`
        scores them as `"O"`.
        """
        words, _ = self._tokenize_words(words)
        encoding = self.tokenizer(
            words, is_split_into_words=True, truncation=True, max_length=max_length or self.max_length
        )
        encoded = {name: encoding[name] for name in ("input_ids", "attention_mask", "token_type_ids")}
        encoded["word_start_mask"], encoded["word_ids"] = [], []
        if tags is not None:
            encoded["labels"] = []
        for index in range(len(words)):
            word_ids = encoding.word_ids(index)
            starts = [
                word is not None and word != previous
                for word, previous in zip(word_ids, [None, *word_ids], strict=False)
            ]
            encoded["word_start_mask"].append(starts)
            encoded["word_ids"].append([-1 if word is None else word for word in word_ids])
            if tags is not None:
                if len(tags[index]) != len(words[index]):
                    raise ValueError(f"Example {index}: {len(words[index])} words but {len(tags[index])} tags")
                encoded["labels"].append(
                    [tags[index][word] if start else -100 for word, start in zip(word_ids, starts, strict=True)]
                )
        return encoded

    def encode_re(
        self,
        words: Sequence[Sequence[str]],
        heads: Sequence[Mapping],
        tails: Sequence[Mapping],
        relations: Sequence[int] | None = None,
        max_length: int | None = None,
    ) -> dict[str, list]:
        """
        Tokenises a batch of word lists with `<s> head </s>` and `<o> tail </o>` inserted around the entity spans
        (`{"start", "end"}` in words, end exclusive). Returns lists of `input_ids`, `attention_mask`,
        `token_type_ids` and, with `relations`, `labels` (relation ids).

        When a sentence is longer than `max_length`, the tokens kept are the ones closest to an entity marker, so
        the four markers and the context around both entities survive, wherever they are in the sentence.
        """
        max_length = max_length or self.max_length
        _check_re_max_length(max_length)
        marked_words = [
            _insert_entity_markers(example_words, head, tail, index)
            for index, (example_words, head, tail) in enumerate(zip(words, heads, tails, strict=True))
        ]
        _, encoding = self._tokenize_words(marked_words)
        marker_ids = set(self.tokenizer.convert_tokens_to_ids(ENTITY_MARKERS))
        encoded = {"input_ids": [], "attention_mask": [], "token_type_ids": []}
        for token_ids in encoding["input_ids"]:
            token_ids = _keep_near_markers(token_ids, marker_ids, max_length - 2)
            input_ids = [self.tokenizer.cls_token_id, *token_ids, self.tokenizer.sep_token_id]
            encoded["input_ids"].append(input_ids)
            encoded["attention_mask"].append([1] * len(input_ids))
            encoded["token_type_ids"].append([0] * len(input_ids))
        if relations is not None:
            encoded["labels"] = list(relations)
        return encoded

    def preprocess_images(
        self,
        image: Image.Image | str | os.PathLike | None,
        objects: Sequence[Image.Image | str | os.PathLike | None] | None = None,
        missing_images: str = "mask",
    ) -> dict[str, torch.Tensor]:
        """
        Decodes (if given paths) and transforms one example's images. Returns `pixel_values` (3, S, S),
        `object_pixel_values` (num_object_images, 3, S, S), `image_mask` () and `object_mask` (num_object_images,).
        Absent or unreadable images (under `missing_images="mask"`) are zeros with mask False; crops beyond
        `num_object_images` are not used.
        """
        pixel_values, image_present = self._image_tensor(image, missing_images)
        objects = list(objects or [])[: self.num_object_images]
        slots = [self._image_tensor(crop, missing_images) for crop in objects]
        slots += [self._image_tensor(None, missing_images)] * (self.num_object_images - len(slots))
        size = (self.num_object_images, 3, self.image_size, self.image_size)
        return {
            "pixel_values": pixel_values,
            "object_pixel_values": torch.stack([tensor for tensor, _ in slots]) if slots else torch.zeros(size),
            "image_mask": torch.tensor(image_present),
            "object_mask": torch.tensor([present for _, present in slots], dtype=torch.bool),
        }

    def post_process_ner(
        self, predicted_tags: Sequence[int] | torch.Tensor, word_ids: Sequence[int], num_words: int
    ) -> list[int]:
        """
        Maps per-token predictions (T,) back to one tag id per word, using the `word_ids` of `encode_ner`. Words cut
        by truncation get tag 0 (`"O"`), so they still count in word-level metrics.
        """
        predicted_tags = predicted_tags.tolist() if isinstance(predicted_tags, torch.Tensor) else predicted_tags
        word_tags = [MNER_LABELS.index("O")] * num_words
        previous = -1
        for tag, word in zip(predicted_tags, word_ids, strict=False):
            if word >= 0 and word != previous:
                word_tags[word] = int(tag)
            previous = word
        return word_tags

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Saves the tokenizer files and the image settings (`processor_config.json`)."""
        os.makedirs(save_directory, exist_ok=True)
        self.tokenizer.save_pretrained(save_directory)
        settings = {
            "processor_class": type(self).__name__,
            "task": self.task,
            "image_size": self.image_size,
            "crop_pct": self.crop_pct,
            "crop_mode": self.crop_mode,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "interpolation": self.interpolation,
            "num_object_images": self.num_object_images,
            "max_length": self.max_length,
        }
        with open(Path(save_directory) / PROCESSOR_CONFIG_NAME, "w", encoding="utf-8") as file:
            json.dump(settings, file, indent=2)

    @classmethod
    def from_pretrained(cls, pretrained_path: str | os.PathLike, **kwargs) -> "HVPNetProcessor":
        """Loads a processor saved by `save_pretrained`; keyword arguments override the saved settings."""
        with open(Path(pretrained_path) / PROCESSOR_CONFIG_NAME, encoding="utf-8") as file:
            settings = json.load(file)
        settings.pop("processor_class", None)
        tokenizer = AutoTokenizer.from_pretrained(pretrained_path)
        return cls(tokenizer, **{**settings, **kwargs})

    def _tokenize_words(self, words: Sequence[Sequence[str]]) -> tuple[list[list[str]], BatchEncoding]:
        """
        Tokenises word lists without special tokens or truncation, after replacing every word that tokenises to
        nothing by the unknown token. Returns the words used and their encoding (the tokenizer runs a second time
        only when a word had to be replaced).
        """
        encoding = self.tokenizer(list(words), is_split_into_words=True, add_special_tokens=False)
        unk = self.tokenizer.unk_token
        replaced, any_empty = [], False
        for index, example in enumerate(words):
            present = set(encoding.word_ids(index))  # a word missing from `word_ids` produced no token
            any_empty = any_empty or len(present) < len(example)
            replaced.append([word if position in present else unk for position, word in enumerate(example)])
        if any_empty:
            encoding = self.tokenizer(replaced, is_split_into_words=True, add_special_tokens=False)
        return replaced, encoding

    def _image_tensor(
        self, image: Image.Image | np.ndarray | str | os.PathLike | None, missing_images: str
    ) -> tuple[torch.Tensor, bool]:
        """One image (or path, or None) as a transformed (3, S, S) tensor, and whether it is present."""
        if isinstance(image, (str, os.PathLike)):
            image = load_image(image, missing_images)
        if image is None:
            return torch.zeros(3, self.image_size, self.image_size), False
        return self.image_transform(_to_rgb(image)), True


def _to_rgb(image: Image.Image | np.ndarray) -> Image.Image:
    """
    Converts any PIL mode (L, P, CMYK, RGBA, 16-bit grayscale, ...) or a numpy array (H, W) or (H, W, C) to an
    upright RGB image: the EXIF orientation is applied, 16-bit values are scaled to 8 bits and transparent pixels are
    put on a white background.
    """
    if isinstance(image, np.ndarray):
        image = _array_to_image(image)
    if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode in HIGH_BIT_DEPTH_MODES:
        image = _high_bit_depth_to_8_bits(image)
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _array_to_image(array: np.ndarray) -> Image.Image:
    """A uint8 or uint16 array (H, W) or (H, W, 1|3|4), channels last, as a PIL image."""
    if array.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"numpy images must be uint8 (or uint16 grayscale), got dtype {array.dtype}")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4) and array.dtype == np.uint8)):
        raise ValueError(
            f"numpy images must be (H, W) grayscale or (H, W, 3|4) channels last, got shape {array.shape} "
            f"and dtype {array.dtype}"
        )
    return Image.fromarray(np.ascontiguousarray(array))


def _high_bit_depth_to_8_bits(image: Image.Image) -> Image.Image:
    """A 16-bit grayscale image as 8-bit "L": values 0..65535 are mapped linearly onto 0..255."""
    _log_high_bit_depth(image.mode)
    values = np.asarray(image, dtype=np.float64)
    return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8))


@functools.cache
def _log_high_bit_depth(mode: str) -> None:
    logger.info("Images of mode %s are read as 16-bit grayscale and scaled to 8 bits (value / 257).", mode)


def _check_re_max_length(max_length: int) -> None:
    if max_length < len(ENTITY_MARKERS) + 2:
        raise ValueError(f"max_length must leave room for [CLS], [SEP] and the 4 entity markers, got {max_length}")


def _insert_entity_markers(words: Sequence[str], head: Mapping, tail: Mapping, index: int) -> list[str]:
    """Inserts `<s>`/`</s>` around the head span and `<o>`/`</o>` around the tail span (word offsets)."""
    for name, span in (("head", head), ("tail", tail)):
        if not 0 <= span["start"] < span["end"] <= len(words):
            raise ValueError(f"Example {index}: {name} span [{span['start']}, {span['end']}) out of range")
    before = [[] for _ in range(len(words) + 1)]
    for span, start_marker, end_marker in ((head, HEAD_START, HEAD_END), (tail, TAIL_START, TAIL_END)):
        before[span["start"]].append(start_marker)
        before[span["end"]].insert(0, end_marker)
    marked = []
    for position, word in enumerate(words):
        marked += before[position]
        marked.append(word)
    return marked + before[len(words)]


def _keep_near_markers(token_ids: list[int], marker_ids: set[int], budget: int) -> list[int]:
    """
    Keeps at most `budget` tokens, in order: all marker tokens, then the tokens nearest to a marker. This cuts the
    sentence around the entities instead of from the right.
    """
    if len(token_ids) <= budget:
        return token_ids
    markers = [position for position, token in enumerate(token_ids) if token in marker_ids]
    distance = [min(abs(position - marker) for marker in markers) for position in range(len(token_ids))]
    kept = sorted(sorted(range(len(token_ids)), key=lambda position: (distance[position], position))[:budget])
    return [token_ids[position] for position in kept]


__all__ = ["ENTITY_MARKERS", "HVPNetProcessor"]
