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
import io
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence

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

# A string naming a remote file (`http://`, `https://`, `hf://`, `s3://`, ...); a one-letter scheme is a Windows drive.
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")

# One image: in memory, a file path, a `datasets.Image()` value read with `decode=False` (`{"bytes": the file's bytes
# or None, "path": its path or None}`, bytes first), or absent (None, "", or such a value with neither).
ImageValue = Image.Image | np.ndarray | str | os.PathLike | Mapping[str, bytes | str | None] | None
# An example's `image`: one image, or a list of the images of a post (see `image_slots`).
ImageInput = ImageValue | Sequence[ImageValue]


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
        images: ImageInput | Sequence[ImageInput],
        objects: Sequence[ImageValue] | Sequence[Sequence[ImageValue]] | None = None,
        missing_images: str = "mask",
    ) -> BatchFeature:
        """
        One example (`images` a single image, `objects` its crops) or a batch (a list or tuple of images, or of lists
        of images, and a list of crop lists). Returns a `BatchFeature` of `pixel_values` (B, 1 + k, 3, S, S), global image first, and
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
        self, image: ImageInput, objects: Sequence[ImageValue] | None = None, missing_images: str = "mask"
    ) -> dict[str, torch.Tensor]:
        """
        Decodes and transforms one example's images, placed in slots by `image_slots`: `pixel_values`
        (1 + num_object_images, 3, S, S) and `image_mask` (1 + num_object_images,). Absent or unreadable images
        (under `missing_images="mask"`) are zeros with mask False.
        """
        slots, _ = image_slots(image, objects, self.num_object_images)
        return self.preprocess_slots(slots, missing_images)

    def preprocess_slots(
        self, slots: Sequence[tuple[str, ImageValue]], missing_images: str
    ) -> dict[str, torch.Tensor]:
        """`pixel_values` (n, 3, S, S) and `image_mask` (n,) of the n (name, image) `slots` that `image_slots` gives."""
        tensors = [self.image_tensor(image, missing_images, name) for name, image in slots]
        return {
            "pixel_values": torch.stack([tensor for tensor, _ in tensors]),
            "image_mask": torch.tensor([present for _, present in tensors], dtype=torch.bool),
        }

    def image_tensor(self, image: ImageValue, missing_images: str, slot: str = "'image'") -> tuple[torch.Tensor, bool]:
        """
        One image value as a transformed (3, S, S) tensor, and whether it is present. An image that `load_image`
        cannot read is masked and logged, or under `missing_images="error"` its `OSError` is raised. An image without
        pixels (0 wide or high, such as an empty box cut from a detector's output) is treated alike, with a
        `ValueError` naming its `slot`. A URL is an error under either policy (`image_source`).
        """
        _check_policy(missing_images)
        try:
            image = decode_image(image, slot)
        except OSError as error:
            if missing_images == "error":
                raise
            logger.warning("%s; it is masked out.", error)
            image = None
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


def image_slots(
    image: ImageInput, objects: Sequence[ImageValue] | None, num_object_images: int
) -> tuple[list[tuple[str, ImageValue]], int]:
    """
    The (name, image) of one example's 1 + `num_object_images` image slots, absent slots None, and how many of its
    images found no slot (logged). `image` is one image or a list of a post's images: the first is the global image
    (slot 0), the others take the next slots, ahead of the object crops, which fill the slots left (crops beyond
    them are not used, as for a single image). The model reads every slot alike (the same backbone, pooling, gate and
    projections, concatenated on the prefix's token axis with no slot embedding), so a second picture in slot 1 is
    read as a crop is: it keeps the model's inputs and weights, where a collage in slot 0 would shrink every picture.
    Images beyond the slots are dropped; raise `num_object_images` (of the model and its processor) to keep more.
    """
    if isinstance(image, (list, tuple)):
        pictures = [(f"'image'[{position}]", picture) for position, picture in enumerate(image)] or [("'image'", None)]
    else:
        pictures = [("'image'", image)]
    crops = [(f"'objects'[{position}]", crop) for position, crop in enumerate(objects or [])]
    num_slots = 1 + num_object_images
    num_dropped = max(len(pictures) - num_slots, 0)
    if num_dropped:
        logger.warning(
            "An example has %d images but %d image slots (1 + num_object_images); its last %d are not used.",
            len(pictures),
            num_slots,
            num_dropped,
        )
    slots = (pictures + crops)[:num_slots]
    slots += [(f"slot {position}", None) for position in range(len(slots), num_slots)]
    return slots, num_dropped


def check_image_value(image: ImageValue, slot: str = "'image'") -> None:
    """Raises a `TypeError` naming `slot` when `image` is not an image value (`ImageValue`)."""
    if isinstance(image, Mapping):
        unknown = set(image) - {"bytes", "path"}
        if unknown or not isinstance(image.get("bytes"), (bytes, type(None))):
            raise TypeError(
                f"{slot} must be a datasets Image() value {{'bytes': bytes or None, 'path': str or None}}, got keys "
                f"{sorted(image)}"
            )
        if not isinstance(image.get("path"), (str, type(None))):
            raise TypeError(f"{slot}['path'] must be a string or None, got {type(image['path']).__name__}")
    elif image is not None and not isinstance(image, (Image.Image, np.ndarray, str, os.PathLike)):
        raise TypeError(
            f"{slot} must be a PIL image, a numpy array, a path, a datasets Image() value ({{'bytes', 'path'}}) or "
            f"None, got {type(image).__name__}"
        )


def is_absent_image(image: ImageValue) -> bool:
    """Whether an image value holds no image: None, "", or an `Image()` value without bytes or path."""
    if isinstance(image, Mapping):
        return not image.get("bytes") and not image.get("path")
    return image is None or (isinstance(image, str) and not image)


def image_source(
    image: ImageValue, slot: str = "'image'"
) -> Image.Image | np.ndarray | str | os.PathLike | bytes | None:
    """
    What is decoded of an image value: the image in memory, a file path, the bytes of an `Image()` value (which win
    over its path), or None where it is absent. A URL (`http(s)://`, `hf://`, ...) is a `ValueError` naming `slot`:
    the package never downloads (offline machines would hang), and it is a setting of the data, not a missing file,
    so it is not masked either.
    """
    check_image_value(image, slot)
    if is_absent_image(image):
        return None
    if isinstance(image, Mapping):
        image = image.get("bytes") or image["path"]
    if isinstance(image, str) and _URL.match(image):
        raise ValueError(
            f"{slot} is a URL ({image}); hvpnet_hf does not download images: download them first and give their "
            "paths or bytes"
        )
    return image


def decode_image(image: ImageValue, slot: str = "'image'") -> Image.Image | None:
    """
    An image value as an upright RGB image (`load_image` for files and bytes, `to_rgb_image` for images in memory),
    None where it is absent. An `OSError` from `load_image` names `slot` (and the path) when it read bytes.
    """
    source = image_source(image, slot)
    if source is None:
        return None
    if isinstance(source, bytes):
        path = image.get("path")
        return load_image(source, name=f"{slot} (the bytes of {path})" if path else f"{slot} ({len(source)} bytes)")
    if isinstance(source, (str, os.PathLike)):
        return load_image(source)
    return to_rgb_image(source)


def load_image(image: str | os.PathLike | bytes, name: str | None = None) -> Image.Image:
    """
    Decodes an image file, or the bytes of one (a `datasets.Image()` value), fully, as an upright RGB image (see
    `to_rgb_image`). Every image the package decodes from a file or bytes (the processor, object crops,
    `extract_objects`, the feature cache) is read here. Like `transformers.image_utils.load_image`, it raises where it
    cannot give an image: an `OSError` naming the file (or `name`) when it is missing, unreadable or over PIL's
    decompression-bomb limit (the PIL error is its `__cause__`).
    """
    if name is None:
        name = f"of {len(image)} bytes" if isinstance(image, bytes) else str(image)
    try:
        with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as opened:
            opened.load()
            return to_rgb_image(opened)
    except UNREADABLE_IMAGE_ERRORS as error:
        raise OSError(f"Cannot read image {name}: {error}") from error


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


__all__ = [
    "HVPNetImageProcessor",
    "check_image_value",
    "decode_image",
    "image_header_problem",
    "image_slots",
    "image_source",
    "is_absent_image",
    "load_image",
    "to_rgb_image",
]
