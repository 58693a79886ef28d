"""
A disk cache of what a frozen vision backbone gives every image (file or embedded bytes), so that an epoch reads features instead of
decoding, transforming and running the backbone on the same images again.

    cache = VisualFeatureCache(model, processor, cache_dir)
    cache.build(image_paths)                      # once; later runs and processes reuse it
    collator = HVPNetDataCollator(processor, feature_cache=cache)

The cache stores, per image file, the output of the encoder's fixed part (`visual_features`: backbone and pooling to
the prefix grid, (g*g, C)); the model turns it into the prefix with its trainable part. Rows are found by the
SHA-256 of the file's bytes: an image given by its path and the same image embedded in a data set (a
`datasets.Image()` value, whose bytes are the file's) share one row. The folder of a cache is named by a hash of everything else that changes the features:
backbone name and weights, feature levels, prefix mode and grid, image transform, storage dtype, the code that
decodes, transforms and pools (this package's image processing module and the encoder's `visual_features` and
pooling), the versions of the libraries they run on (torch, torchvision, timm, Pillow and its codecs), PIL's
process-wide decoding settings (`decoding_policy`), and the device the backbone computes on with torch's float32
precision settings there (TF32, bfloat16). Its files:

    features.npy    (rows, g*g, C) memory-mapped; row 0 holds the features of an all-zero image (absent images)
    index.json      {file SHA-256: row} for the images that decoded
    meta.json       the key, the shape and the SHA-256 of the two files above, written last

A file that cannot be decoded gets no row: it is masked for the run and tried again by the next build, so a file
that a later build can read (a raised limit, a new Pillow plugin, a passing read error) is never served as
unreadable. A cache whose `meta.json` is missing, or whose key or checksums do not match, is rebuilt (with a
warning), never read. A file lock lets one process build while others (`torchrun`, `accelerate launch`) wait and then
read.
"""

import hashlib
import inspect
import json
import logging
import operator
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import PIL
import timm
import torch
import torchvision
from filelock import FileLock
from huggingface_hub import constants
from PIL import GifImagePlugin, Image, ImageFile, PngImagePlugin, TiffImagePlugin, features
from tqdm.auto import tqdm

from . import image_processing_hvpnet
from .frozen_backbone import speed_up_frozen_backbone
from .image_processing_hvpnet import ImageInput, ImageValue, _check_policy, image_slots, image_source
from .output_files import atomic_write

if TYPE_CHECKING:
    from datasets import Dataset, IterableDataset
    from transformers import PreTrainedModel

    from .processing_hvpnet import HVPNetProcessor

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 2
# float16 halves the size; tests/test_feature_cache.py states how far the outputs then move.
STORAGE_DTYPES = {"float32": np.float32, "float16": np.float16}
ZERO_IMAGE_ROW = 0
UNREADABLE_ROW = -1
# How the cache names embedded bytes (an image file is named by its path): this prefix and their SHA-256.
BYTES_KEY_PREFIX = "sha256:"
# Rows of a data set's image columns read at a time while gathering the images of `build_feature_cache`.
ROWS_PER_READ = 1000
# The image codecs Pillow decodes with (their versions), and its plugins that read formats of their own.
PIL_DECODERS = (*features.codecs, "webp", "avif")


class VisualFeatureCache:
    """
    Cached `visual_features` of images (files, or the bytes of `datasets.Image()` values) for one frozen backbone and
    one image transform.

    Args:
        model: an HVPNeT model (or `HVPNetModel`) whose backbone is frozen (`freeze_vision=True`); its backbone is
            sped up for the passes that build the cache (`speed_up_frozen_backbone`, which keeps its outputs).
        processor (`HVPNetProcessor`): the image transform and `num_object_images` of its image processor are used.
        cache_dir (`str` or `os.PathLike`): parent folder; each key gets its own sub-folder.
        dtype (`str`): `"float32"` (the pixel path's outputs exactly) or `"float16"` (half the size).
        missing_images (`str`): `"mask"` masks unreadable files (logged and counted in `num_unreadable`),
            `"error"` raises.
        batch_size (`int`): images per backbone call while building.

    PIL's decoding settings (`decoding_policy`), the model's device and torch's float32 precision settings are read
    when the cache is made: set them before, and leave them so until `build` has run.
    """

    def __init__(
        self,
        model: "PreTrainedModel",
        processor: "HVPNetProcessor",
        cache_dir: str | os.PathLike,
        dtype: str = "float32",
        missing_images: str = "mask",
        batch_size: int = 32,
    ):
        base = getattr(model, "hvpnet", model)
        self.encoder = base.visual_encoder
        if self.encoder is None:
            raise ValueError("The model has no visual prefix (use_visual_prefix=False): there is nothing to cache")
        if not self.encoder.freeze_backbone:
            raise ValueError("Features can only be cached for a frozen backbone (freeze_vision=True)")
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
        _check_policy(missing_images)
        speed_up_frozen_backbone(model)
        self.image_processor = image_processor = processor.image_processor
        self.dtype = dtype
        self.missing_images = missing_images
        self.batch_size = batch_size
        config = base.config
        self.key = {
            "format": CACHE_FORMAT_VERSION,
            "backbone": config.vision_backbone,
            "backbone_weights_sha256": _state_dict_sha256(self.encoder.backbone),
            "vision_out_indices": list(self.encoder.backbone.feature_info.out_indices),
            "vision_model_args": config.vision_model_args,
            "prefix_mode": config.prefix_mode,
            "prefix_grid": config.prefix_grid,
            "image_transform": {
                "image_size": image_processor.image_size,
                "crop_pct": image_processor.crop_pct,
                "crop_mode": image_processor.crop_mode,
                "image_mean": list(image_processor.image_mean),
                "image_std": list(image_processor.image_std),
                "interpolation": image_processor.interpolation,
            },
            "dtype": dtype,
            "code_sha256": _feature_code_sha256(self.encoder),
            "libraries": {
                "torch": torch.__version__,
                "torchvision": torchvision.__version__,
                "timm": timm.__version__,
                "Pillow": PIL.__version__,
                "Pillow decoders": {name: features.version(name) for name in PIL_DECODERS},
            },
            "decoding": decoding_policy(),
            "compute": self._compute_settings(),
        }
        key_hash = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:20]
        self.folder = Path(cache_dir) / key_hash
        self.num_unreadable = 0  # images of all builds so far that are missing or could not be decoded
        self._rows: dict[str, int] = {}  # file SHA-256 -> row, for the images that decoded
        self._hashes: dict[
            str, str
        ] = {}  # image key (`_image_key`) -> file SHA-256, "" for a file that cannot be read
        self._features: np.ndarray | None = None

    def build(self, images: Iterable[ImageValue]) -> "VisualFeatureCache":
        """Makes sure every readable image in `images` (file paths or `Image()` values; absent ones are skipped) has a
        row (computing only the images without one, and trying again those that could not be decoded before), then
        opens the cache for reading. A URL or an image in memory is an error, raised before any image is decoded."""
        check_decoding_policy(self.key["decoding"], "VisualFeatureCache")
        if self._compute_settings() != self.key["compute"]:
            raise ValueError(
                f"The backbone now computes with {self._compute_settings()}, but with {self.key['compute']} when "
                "this VisualFeatureCache was made; make the cache after moving the model and setting torch's "
                "float32 precision"
            )
        unique_images = {}  # image key -> the first image of that key
        for image in images:
            key = _image_key(image)
            if key is not None:
                unique_images.setdefault(key, image)
        hashes = {key: _image_sha256(key, self.missing_images) for key in sorted(unique_images)}
        self.folder.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.folder / ".lock")):
            rows = self._read_index()
            missing = {}
            for key, file_hash in hashes.items():
                if file_hash and file_hash not in rows:
                    missing.setdefault(file_hash, unique_images[key])
            if missing or not rows:
                rows = self._add(rows, missing)
        self._rows = rows
        self._hashes.update(hashes)
        self._features = np.load(self.folder / "features.npy", mmap_mode="r")
        for key, file_hash in hashes.items():
            if file_hash not in rows:
                logger.warning("Image %s is missing or unreadable; it is masked out.", _image_name(unique_images[key]))
        self.num_unreadable = sum(file_hash not in rows for file_hash in self._hashes.values())
        return self

    def row(self, image: ImageValue) -> int:
        """The row of one image (a path or an `Image()` value): `ZERO_IMAGE_ROW` for no image, `UNREADABLE_ROW` for
        one that could not be decoded. An image that `build` did not see is an error."""
        key = _image_key(image)
        if key is None:
            return ZERO_IMAGE_ROW
        file_hash = self._hashes.get(key)
        if file_hash is None:
            raise KeyError(
                f"Image {_image_name(image)} is not in the feature cache {self.folder}; pass it to build() first"
            )
        return self._rows.get(file_hash, UNREADABLE_ROW)

    def example_features(
        self, image: ImageInput, objects: Sequence[ImageValue] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One example's `image_features` (1 + k, g*g, C), float32, and `image_features_mask` (1 + k,): its images in
        the slots `image_slots` gives them (the global image, then up to k = `num_object_images` other images and
        crops). Absent or unreadable images hold the features of a zero image and are masked."""
        if self._features is None:
            raise RuntimeError("Call build() before reading from the feature cache")
        slots, _ = image_slots(image, objects, self.image_processor.num_object_images)
        rows = [self.row(source) for _, source in slots]
        present = torch.tensor([row not in (ZERO_IMAGE_ROW, UNREADABLE_ROW) for row in rows])
        read_rows = [row if row != UNREADABLE_ROW else ZERO_IMAGE_ROW for row in rows]
        features = torch.from_numpy(np.asarray(self._features[read_rows], dtype=np.float32))
        return features, present

    def _read_index(self) -> dict[str, int]:
        """The rows of a valid cache in `self.folder`, or {} when there is none or it does not check out."""
        meta_path = self.folder / "meta.json"
        if not meta_path.exists():
            return {}
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            problem = None
            if meta.get("key") != self.key:
                problem = "its key differs from this model and processor"
            elif meta.get("features_sha256") != _file_sha256(self.folder / "features.npy", "error"):
                problem = "features.npy does not match its checksum"
            elif meta.get("index_sha256") != _file_sha256(self.folder / "index.json", "error"):
                problem = "index.json does not match its checksum"
        except (OSError, ValueError) as error:
            problem = f"it cannot be read ({error})"
        if problem is not None:
            logger.warning("Feature cache %s is rebuilt: %s.", self.folder, problem)
            return {}
        return json.loads((self.folder / "index.json").read_text(encoding="utf-8"))

    def _add(self, rows: dict[str, int], missing: dict[str, ImageValue]) -> dict[str, int]:
        """Computes the features of the `missing` {file SHA-256: image} that decode, into a scratch file, and writes
        the cache with them added (a new cache also when none decodes); returns the rows of the cache now."""
        if rows:
            old_features = np.load(self.folder / "features.npy", mmap_mode="r")
        else:  # a new cache starts with the zero image
            size = self.image_processor.image_size
            old_features = self._compute(torch.zeros(1, 3, size, size))
        scratch_path = self.folder / "new_features.partial"  # one name: a killed build's leftover is overwritten
        scratch = np.lib.format.open_memmap(
            scratch_path, mode="w+", dtype=old_features.dtype, shape=(len(missing), *old_features.shape[1:])
        )
        try:
            found = self._compute_files(missing, scratch)
            if found or not rows:
                rows = self._write(rows, old_features, scratch[: len(found)], found)
        finally:
            del scratch
            scratch_path.unlink()
        return rows

    def _compute_files(self, files: dict[str, ImageValue], into: np.ndarray) -> dict[str, int]:
        """Decodes the {file SHA-256: image} `files` and writes the features of those that decode to the first rows
        of `into`, in order; returns {file SHA-256: row of `into`} for them."""
        found: dict[str, int] = {}
        items = list(files.items())
        with tqdm(total=len(items), desc="Caching visual features", unit="image") as progress:
            for start in range(0, len(items), self.batch_size):
                batch = items[start : start + self.batch_size]
                decoded = [
                    (file_hash, self.image_processor.image_tensor(image, self.missing_images))
                    for file_hash, image in batch
                ]
                readable = [(file_hash, pixels) for file_hash, (pixels, present) in decoded if present]
                if readable:
                    first = len(found)
                    into[first : first + len(readable)] = self._compute(
                        torch.stack([pixels for _, pixels in readable])
                    )
                    found.update((file_hash, first + offset) for offset, (file_hash, _) in enumerate(readable))
                progress.update(len(batch))
        return found

    def _write(
        self, rows: dict[str, int], old_features: np.ndarray, new_features: np.ndarray, new_rows: dict[str, int]
    ) -> dict[str, int]:
        """Writes a cache of `old_features` (whose rows `rows` gives) followed by `new_features` (whose rows
        `new_rows` gives, from 0); meta.json last. Returns the rows written."""
        num_old = len(old_features)
        shape = (num_old + len(new_features), *old_features.shape[1:])
        rows = {**rows, **{file_hash: num_old + row for file_hash, row in new_rows.items()}}
        # features.npy and index.json replace the old ones only when both are written; meta.json, which holds their
        # checksums, is written last, so a cache interrupted at any point is rebuilt rather than read.
        with (
            atomic_write(self.folder / "features.npy") as features_temporary,
            atomic_write(self.folder / "index.json") as index_temporary,
        ):
            features = np.lib.format.open_memmap(
                features_temporary, mode="w+", dtype=STORAGE_DTYPES[self.dtype], shape=shape
            )
            features[:num_old] = old_features
            features[num_old:] = new_features
            features.flush()
            del features
            index_temporary.write_text(json.dumps(rows), encoding="utf-8")
            meta = {
                "key": self.key,
                "shape": list(shape),
                "features_sha256": _file_sha256(features_temporary, "error"),
                "index_sha256": _file_sha256(index_temporary, "error"),
            }
        with atomic_write(self.folder / "meta.json") as meta_temporary:
            meta_temporary.write_text(json.dumps(meta, indent=2), encoding="utf-8")
        return rows

    def _compute_settings(self) -> dict[str, str]:
        """The device the backbone computes on and torch's process-wide float32 precision settings there (TF32 or
        bfloat16 for float32 convolutions and matmuls, on by default for cuDNN's convolutions)."""
        device = next(self.encoder.parameters()).device.type
        backends = {"cuda": ("cudnn.conv", "cudnn", "cuda.matmul"), "cpu": ("mkldnn.conv", "mkldnn", "mkldnn.matmul")}
        settings = {"device": device, "fp32_precision": torch.backends.fp32_precision}
        for backend in backends.get(device, ()):
            settings[f"{backend}.fp32_precision"] = operator.attrgetter(backend)(torch.backends).fp32_precision
        return settings

    def _compute(self, pixels: torch.Tensor) -> np.ndarray:
        """pixels (N, 3, S, S) → (N, g*g, C) features as the storage dtype, in the backbone's own dtype also when
        the caller runs under autocast (which the key does not hold)."""
        device = next(self.encoder.parameters()).device
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            features = self.encoder.visual_features(pixels.to(device))
        return features.float().cpu().numpy().astype(STORAGE_DTYPES[self.dtype])


def decoding_policy() -> dict[str, int | bool | str | None]:
    """PIL's process-wide settings that change what `load_image` makes of an image file (whether it is refused, how
    far it is read, which decoder reads it), by their names."""
    return {
        "PIL.Image.MAX_IMAGE_PIXELS": Image.MAX_IMAGE_PIXELS,
        "PIL.ImageFile.LOAD_TRUNCATED_IMAGES": ImageFile.LOAD_TRUNCATED_IMAGES,
        "PIL.PngImagePlugin.MAX_TEXT_CHUNK": PngImagePlugin.MAX_TEXT_CHUNK,
        "PIL.PngImagePlugin.MAX_TEXT_MEMORY": PngImagePlugin.MAX_TEXT_MEMORY,
        "PIL.TiffImagePlugin.READ_LIBTIFF": TiffImagePlugin.READ_LIBTIFF,
        "PIL.GifImagePlugin.LOADING_STRATEGY": GifImagePlugin.LOADING_STRATEGY.name,
    }


def check_decoding_policy(policy: dict[str, int | bool | str | None], made: str) -> None:
    """Refuses to decode under PIL settings other than `policy`, those of the process where a `made` was made."""
    for setting, value in decoding_policy().items():
        if value != policy[setting]:
            raise ValueError(
                f"{setting} is {value!r} here but was {policy[setting]!r} where this {made} was made: set PIL's "
                "decoding settings before making it (and in DataLoader workers that are not forked, with "
                "worker_init_fn)"
            )


def _image_key(image: ImageValue) -> str | None:
    """How the cache names an image: a file by its path, embedded bytes by `BYTES_KEY_PREFIX` and their SHA-256; None
    for no image. URLs are refused (`image_source`), and so are images in memory, which have no file to hash."""
    source = image_source(image)
    if source is None:
        return None
    if isinstance(source, bytes):
        return BYTES_KEY_PREFIX + hashlib.sha256(source).hexdigest()
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"The feature cache reads images from files or datasets Image() values, got a {type(source).__name__}"
        )
    return str(source)


def _image_name(image: ImageValue) -> str:
    """An image's name in messages: its path, or for bytes without one their key."""
    path = image.get("path") if isinstance(image, Mapping) else image
    return str(path or _image_key(image))


def _image_sha256(key: str, missing_images: str) -> str:
    """The file SHA-256 of the image of `key` (`_image_key`): read from a key of bytes, or computed from the file."""
    if key.startswith(BYTES_KEY_PREFIX):
        return key.removeprefix(BYTES_KEY_PREFIX)
    return _file_sha256(key, missing_images)


def _file_sha256(path: str | os.PathLike, missing_images: str) -> str:
    """SHA-256 of a file's bytes; "" for a file that cannot be read under `missing_images="mask"`."""
    try:
        with open(path, "rb") as file:
            return hashlib.file_digest(file, "sha256").hexdigest()
    except OSError as error:
        if missing_images == "error":
            raise OSError(f"Cannot read image {path}: {error}") from error
        return ""


def _split_images(split: "Dataset | IterableDataset") -> Iterator[ImageValue]:
    """Every image of a split's `image` (one or a list) and `objects` columns, read as Arrow stores them (`Image()`
    values undecoded), a slice of rows at a time."""
    columns = split.select_columns(["image", "objects"]).with_format("arrow")
    for table in columns.iter(batch_size=ROWS_PER_READ):
        for image, objects in zip(table["image"].to_pylist(), table["objects"].to_pylist(), strict=True):
            yield from image if isinstance(image, list) else [image]
            yield from objects or []


def _feature_code_sha256(encoder: torch.nn.Module) -> str:
    """SHA-256 of the source of what turns an image file into cached features: the image processing module
    (decoding, RGB conversion, transform) and the encoder's `visual_features` and `pool_feature_maps`."""
    digest = hashlib.sha256(inspect.getsource(image_processing_hvpnet).encode())
    for method in (type(encoder).visual_features, type(encoder).pool_feature_maps):
        digest.update(inspect.getsource(method).encode())
    return digest.hexdigest()


def _state_dict_sha256(module: torch.nn.Module) -> str:
    """SHA-256 over a module's parameters and buffers, by name, in a fixed order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def build_feature_cache(
    model: "PreTrainedModel",
    processor: "HVPNetProcessor",
    splits: Iterable["Dataset | IterableDataset"],
    cache_dir: str | os.PathLike | None = None,
    missing_images: str = "mask",
) -> VisualFeatureCache | None:
    """
    A built cache of the features of every image and object crop of `splits` (tokenized data sets, in memory or
    iterable, with `image` and `objects` columns of paths or `Image()` values, read undecoded), in `cache_dir` (default: `$HF_HOME/hvpnet_hf/visual_features`); None when the model has
    no frozen backbone to cache. Under torchrun / accelerate one process builds while the others wait, then all read.
    """
    config = model.config
    if not (config.use_visual_prefix and config.freeze_vision):
        return None
    cache_dir = cache_dir or os.path.join(constants.HF_HOME, "hvpnet_hf", "visual_features")
    cache = VisualFeatureCache(model, processor, cache_dir, missing_images=missing_images)
    cache.build(image for split in splits for image in _split_images(split))
    logger.info("visual feature cache %s (%d unreadable images masked)", cache.folder, cache.num_unreadable)
    return cache


__all__ = ["VisualFeatureCache", "build_feature_cache", "check_decoding_policy", "decoding_policy"]
