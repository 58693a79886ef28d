"""
Image processor for HVPNeT: decodes the global image and the object crops of an example and applies the vision
backbone's evaluation transform (resize, center crop or squash, normalize) from timm.

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
import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.transforms import ResizeKeepRatio, str_to_pil_interp
from transformers import BaseImageProcessor, BatchFeature
from transformers.processing_utils import ImagesKwargs

logger = logging.getLogger(__name__)

MISSING_IMAGE_POLICIES = ("mask", "error")
# timm's evaluation crop modes; timm reads any other value as "center".
CROP_MODES = ("center", "squash", "border")
DEFAULT_IMAGE_SIZE = 224
# One example's images, stacked: the global image in slot 0, then the object-crop slots; and which slots hold an image.
IMAGE_INPUT_NAMES = ("pixel_values", "image_mask")
# What PIL raises for an absent, undecodable or over-large (`Image.MAX_IMAGE_PIXELS`) image file.
UNREADABLE_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
# PIL modes of 16-bit grayscale images (PNG, TIFF). The 32-bit mode "I" has no fixed range and keeps PIL's conversion.
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
# timm's transform resizes the whole image before its center crop, so a strip of 40000 x 1 pixels would first become
# a 10 million x 256 image. Where that resize would hold more than this many (image_size x image_size) squares beyond
# the image's own pixels, only the pixels of the crop are resized (`HVPNetImageProcessor.resize_and_crop`).
MAX_RESIZE_SQUARES = 64
# The half-width, in source pixels at scale 1, of PIL's resampling filters.
_FILTER_SUPPORT = {
    Image.Resampling.NEAREST: 0.5,
    Image.Resampling.BOX: 0.5,
    Image.Resampling.BILINEAR: 1.0,
    Image.Resampling.HAMMING: 1.0,
    Image.Resampling.BICUBIC: 2.0,
    Image.Resampling.LANCZOS: 3.0,
}

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
            straight to `image_size x image_size` (what the authors' original code does); `"border"` (timm's) fits
            the whole image in the square and pads it.
        image_mean, image_std (`Sequence[float]`): normalization per RGB channel.
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
        if crop_mode not in CROP_MODES:
            raise ValueError(f"crop_mode must be one of {CROP_MODES}, got {crop_mode!r}")
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
        """The settings (JSON-serializable); the timm transform is rebuilt from them when loading."""
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
        names = ["'image'", *(f"'objects'[{position}]" for position in range(len(crops)))]
        slots = [
            self.image_tensor(source, missing_images, name)
            for source, name in zip((image, *crops), names, strict=True)
        ]
        return {
            "pixel_values": torch.stack([tensor for tensor, _ in slots]),
            "image_mask": torch.tensor([present for _, present in slots], dtype=torch.bool),
        }

    def image_tensor(
        self, image: ImageSource, missing_images: str, slot: str = "'image'"
    ) -> tuple[torch.Tensor, bool]:
        """
        One image (or path, or None) as a transformed (3, S, S) tensor, and whether it is present. A file that
        `load_image` cannot read is masked and logged, or under `missing_images="error"` its `OSError` is raised. An
        image without pixels (0 wide or high, such as an empty box cut from a detector's output) is treated alike,
        with a `ValueError` naming its `slot`.
        """
        _check_policy(missing_images)
        if isinstance(image, (str, os.PathLike)):
            try:
                image = load_image(image)
            except OSError as error:
                if missing_images == "error":
                    raise
                logger.warning("%s; it is masked out.", error)
                image = None
        elif image is not None:
            image = to_rgb_image(image)
        if image is not None and 0 in image.size:
            problem = f"{slot} has no pixels ({image.width} x {image.height})"
            if missing_images == "error":
                raise ValueError(problem)
            logger.warning("%s; it is masked out.", problem)
            image = None
        if image is None:
            return torch.zeros(3, self.image_size, self.image_size), False
        return self.transform(image), True

    def transform(self, image: Image.Image) -> torch.Tensor:
        """
        The RGB `image` as a normalized (3, S, S) tensor: timm's transform, step by step, with its resize made safe
        for strips (see `MAX_RESIZE_SQUARES`); every other image gets exactly timm's steps.
        """
        resize, crop, *rest = self.image_transform.transforms
        if isinstance(resize, ResizeKeepRatio):  # crop_mode="border": the longer side fits, memory is bounded
            height, width = resize.get_params(image, resize.size, resize.longest)
            # timm rounds a strip's shorter side down to 0 pixels, which PIL refuses: it keeps 1 pixel here.
            resized = (
                resize(image) if height and width else image.resize((max(width, 1), max(height, 1)), self._resample)
            )
            image = crop(resized)
        else:
            resized_width, resized_height = _resized_size(image.size, resize.size)
            # PIL resizes in two passes, the first one horizontal: a resized_width x height image, then the output.
            resize_pixels = resized_width * (resized_height + image.height)
            if resize_pixels <= image.width * image.height + MAX_RESIZE_SQUARES * self.image_size**2:
                image = crop(resize(image))
            else:
                image = self.resize_and_crop(image, (resized_width, resized_height), crop.size)
        for step in rest:
            image = step(image)
        return image

    @property
    def _resample(self) -> Image.Resampling:
        return str_to_pil_interp(self.interpolation)

    def resize_and_crop(
        self, image: Image.Image, resized_size: tuple[int, int], crop_size: Sequence[int]
    ) -> Image.Image:
        """
        What resizing `image` to `resized_size` (width, height) and taking its central `crop_size` (height, width)
        gives, computed by resizing only the crop's region of the source (PIL's `box`), so that memory does not grow
        with the resized image: the same source positions, filter and order of PIL's two passes (horizontal first,
        except for images over 100 times taller than wide that get shorter). Only the sample positions round
        differently: on strips of up to 40000 pixels, about 1 value in 1000 differs from timm's, by at most 2 gray
        levels (2 / 255) with `crop_mode="center"`; `"squash"` gives the same values.
        """
        resized_width, resized_height = resized_size
        crop_height, crop_width = crop_size
        # torchvision's CenterCrop offsets, and the crop's region in source pixels.
        top = int(round((resized_height - crop_height) / 2.0))
        left = int(round((resized_width - crop_width) / 2.0))
        scale_x, scale_y = image.width / resized_width, image.height / resized_height
        box = (
            left * scale_x,
            top * scale_y,
            min((left + crop_width) * scale_x, image.width),
            min((top + crop_height) * scale_y, image.height),
        )
        resample = self._resample
        if image.height > 100 * image.width and resized_height >= image.height:
            # PIL would reduce the height first for the crop alone, though not for the whole resize: keep its order
            # (horizontal first) on the rows the vertical pass reads.
            margin = math.ceil(_FILTER_SUPPORT[resample] * max(scale_y, 1.0)) + 1
            first, last = max(math.floor(box[1]) - margin, 0), min(math.ceil(box[3]) + margin, image.height)
            rows = image.crop((0, first, image.width, last))
            rows = rows.resize((crop_width, rows.height), resample, box=(box[0], 0, box[2], rows.height))
            return rows.resize(
                (crop_width, crop_height), resample, box=(0, box[1] - first, crop_width, box[3] - first)
            )
        return image.resize((crop_width, crop_height), resample, box=box)


def load_image(path: str | os.PathLike) -> Image.Image:
    """
    Decodes an image file fully, as an upright RGB image (see `to_rgb_image`). Every image file the package reads
    (the processor, object crops, `extract_objects`, the feature cache) is read here. Like
    `transformers.image_utils.load_image`, it raises where it cannot give an image: an `OSError` naming the file
    when it is missing, unreadable or over PIL's decompression-bomb limit (the PIL error is its `__cause__`).
    """
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb_image(image)
    except UNREADABLE_IMAGE_ERRORS as error:
        raise OSError(f"Cannot read image {path}: {error}") from error


def image_header_problem(path: str | os.PathLike) -> str | None:
    """
    Why `load_image` would refuse `path`, judged from the file's header alone (no pixels are decoded): None when the
    file exists and PIL recognizes it within its decompression-bomb limit. Truncated pixel data shows only when the
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


def _resized_size(size: tuple[int, int], resize_size: int | Sequence[int]) -> tuple[int, int]:
    """The (width, height) torchvision's `Resize(resize_size)` gives an image of `size` (width, height): the short
    side to `resize_size` (the long one scaled alike, rounded down), or (height, width) as given."""
    if isinstance(resize_size, int) or len(resize_size) == 1:
        short = resize_size if isinstance(resize_size, int) else resize_size[0]
        width, height = size
        long = int(short * max(width, height) / min(width, height))
        return (long, short) if width > height else (short, long)
    return resize_size[1], resize_size[0]


def _check_policy(missing_images: str) -> None:
    if missing_images not in MISSING_IMAGE_POLICIES:
        raise ValueError(f"missing_images must be one of {MISSING_IMAGE_POLICIES}, got {missing_images!r}")


__all__ = ["HVPNetImageProcessor", "image_header_problem", "load_image", "to_rgb_image"]
