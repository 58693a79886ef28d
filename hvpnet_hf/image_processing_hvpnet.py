"""
Image processor for HVPNeT: decodes the global image and the object crops of an example and applies the vision
backbone's evaluation transform (resize, center crop or squash, normalise) from timm.

`HVPNetImageProcessor` subclasses `BaseImageProcessor` rather than using transformers' `TimmWrapperImageProcessor`:
the wrapper reads its settings from a timm model's `config.json`, refuses `save_pretrained`, has no `crop_mode`
(the authors' code squashes images) and returns one `pixel_values` per image, while HVPNeT needs a global image plus
a fixed number of object-crop slots with masks for absent images. The transform itself is still timm's
`create_transform`, so the pixels are what timm's own evaluation pipeline gives.

This module (like `processing_hvpnet.py`) is copied next to a saved processor, so it imports only transformers,
timm, torch and PIL.
"""

import functools
import logging
import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from transformers import BaseImageProcessor, BatchFeature
from transformers.processing_utils import ImagesKwargs

logger = logging.getLogger(__name__)

MISSING_IMAGE_POLICIES = ("mask", "error")
DEFAULT_IMAGE_SIZE = 224
# One example's images, stacked: the global image in slot 0, then the object-crop slots; and which slots hold an image.
IMAGE_INPUT_NAMES = ("pixel_values", "image_mask")
# What PIL raises for an absent, undecodable or over-large (`Image.MAX_IMAGE_PIXELS`) image file.
UNREADABLE_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
# PIL modes of 16-bit grayscale images (PNG, TIFF). The 32-bit mode "I" has no fixed range and keeps PIL's conversion.
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N")

ImageSource = Image.Image | np.ndarray | str | os.PathLike | None


class HVPNetImagesKwargs(ImagesKwargs, total=False):
    """The settings of `HVPNetImageProcessor` that `ImagesKwargs` does not name (`from_pretrained` overrides)."""

    image_size: int
    crop_pct: float
    crop_mode: str
    interpolation: str
    num_object_images: int


class HVPNetImageProcessor(BaseImageProcessor):
    r"""
    Turns one example's global image and object crops into `pixel_values` (1 + num_object_images, 3, S, S), the
    global image in slot 0 and the crops after it, and `image_mask` (1 + num_object_images,), False for an absent
    image; `__call__` / `preprocess` stack a batch of examples.

    Args:
        image_size (`int`): side of the square image after the center crop.
        crop_pct (`float`): images are first resized so their short side is `image_size / crop_pct`.
        crop_mode (`str`): `"center"` keeps the aspect ratio and takes the central square; `"squash"` resizes
            straight to `image_size x image_size` (what the authors' original code does).
        image_mean, image_std (`Sequence[float]`): normalisation per RGB channel.
        interpolation (`str`): resize interpolation (`"bilinear"`, `"bicubic"`, ...).
        num_object_images (`int`): object-crop slots per example; fewer crops are padded with zeros and masked.
    """

    model_input_names = list(IMAGE_INPUT_NAMES)
    valid_kwargs = HVPNetImagesKwargs

    def __init__(
        self,
        image_size: int = DEFAULT_IMAGE_SIZE,
        crop_pct: float = 0.875,
        crop_mode: str = "center",
        image_mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        image_std: Sequence[float] = IMAGENET_DEFAULT_STD,
        interpolation: str = "bicubic",
        num_object_images: int = 3,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.image_size = image_size
        self.crop_pct = crop_pct
        self.crop_mode = crop_mode
        self.image_mean = tuple(image_mean)
        self.image_std = tuple(image_std)
        self.interpolation = interpolation
        self.num_object_images = num_object_images
        self.image_transform = create_transform(
            input_size=(3, image_size, image_size),
            crop_pct=crop_pct,
            crop_mode=crop_mode,
            mean=self.image_mean,
            std=self.image_std,
            interpolation=interpolation,
        )

    def to_dict(self) -> dict:
        """The settings (JSON-serialisable); the timm transform is rebuilt from them when loading."""
        settings = super().to_dict()
        settings.pop("image_transform", None)
        settings["image_mean"], settings["image_std"] = list(self.image_mean), list(self.image_std)
        return settings

    def preprocess(
        self,
        images: ImageSource | Sequence[ImageSource],
        objects: Sequence[ImageSource] | Sequence[Sequence[ImageSource]] | None = None,
        missing_images: str = "mask",
    ) -> BatchFeature:
        """
        One example (`images` a single image, `objects` its crops) or a batch (a list or tuple of images and a list
        of crop lists). Returns a `BatchFeature` of `pixel_values` (B, 1 + k, 3, S, S), global image first, and
        `image_mask` (B, 1 + k), with k = `num_object_images`.
        """
        if not isinstance(images, (list, tuple)):
            images, objects = [images], [objects]
        objects = objects if objects is not None else [None] * len(images)
        examples = [
            self.preprocess_example(image, crops, missing_images) for image, crops in zip(images, objects, strict=True)
        ]
        return BatchFeature({name: torch.stack([example[name] for example in examples]) for name in IMAGE_INPUT_NAMES})

    def preprocess_example(
        self, image: ImageSource, objects: Sequence[ImageSource] | None = None, missing_images: str = "mask"
    ) -> dict[str, torch.Tensor]:
        """
        Decodes (if given paths) and transforms one example's images: `pixel_values` (1 + num_object_images, 3, S, S),
        global image first, and `image_mask` (1 + num_object_images,). Absent or unreadable images (under
        `missing_images="mask"`) are zeros with mask False; crops beyond `num_object_images` are not used.
        """
        crops = list(objects or [])[: self.num_object_images]
        crops += [None] * (self.num_object_images - len(crops))
        slots = [self.image_tensor(source, missing_images) for source in (image, *crops)]
        return {
            "pixel_values": torch.stack([tensor for tensor, _ in slots]),
            "image_mask": torch.tensor([present for _, present in slots], dtype=torch.bool),
        }

    def image_tensor(self, image: ImageSource, missing_images: str) -> tuple[torch.Tensor, bool]:
        """One image (or path, or None) as a transformed (3, S, S) tensor, and whether it is present."""
        if isinstance(image, (str, os.PathLike)):
            image = load_image(image, missing_images)
        elif image is not None:
            image = to_rgb_image(image)
        if image is None:
            return torch.zeros(3, self.image_size, self.image_size), False
        return self.image_transform(image), True


def load_image(path: str | os.PathLike, missing_images: str = "mask") -> Image.Image | None:
    """
    Decodes an image file fully, as an upright RGB image (see `to_rgb_image`). Every image file the package reads
    (the processor, object crops, `extract_objects`, the feature cache) is read here. Under `missing_images="mask"`
    a missing or unreadable file, or one over PIL's decompression-bomb limit, is logged and gives None; under
    `"error"` it raises an `OSError` naming the file.
    """
    _check_policy(missing_images)
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb_image(image)
    except UNREADABLE_IMAGE_ERRORS as error:
        if missing_images == "error":
            raise OSError(f"Cannot read image {path}: {error}") from error
        logger.warning("Image %s is missing or unreadable (%s); it is masked out.", path, error)
        return None


def image_header_problem(path: str | os.PathLike) -> str | None:
    """
    Why `load_image` would refuse `path`, judged from the file's header alone (no pixels are decoded): None when the
    file exists and PIL recognises it within its decompression-bomb limit. Truncated pixel data shows only when the
    file is decoded.
    """
    try:
        with Image.open(path):
            return None
    except UNREADABLE_IMAGE_ERRORS as error:
        return str(error) or type(error).__name__


def to_rgb_image(image: Image.Image | np.ndarray) -> Image.Image:
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


def _check_policy(missing_images: str) -> None:
    if missing_images not in MISSING_IMAGE_POLICIES:
        raise ValueError(f"missing_images must be one of {MISSING_IMAGE_POLICIES}, got {missing_images!r}")


__all__ = ["HVPNetImageProcessor", "image_header_problem", "load_image", "to_rgb_image"]
