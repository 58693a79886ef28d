"""
A disk cache of what a frozen vision backbone gives every image file, so that an epoch reads features instead of
decoding, transforming and running the backbone on the same images again.

    cache = VisualFeatureCache(model, processor, cache_dir)
    cache.build(image_paths)                      # once; later runs and processes reuse it
    collator = HVPNetDataCollator(processor, feature_cache=cache)

The cache stores, per image file, the output of the encoder's fixed part (`visual_features`: backbone and pooling to
the prefix grid, (g*g, C)); the model turns it into the prefix with its trainable part. Rows are found by the
SHA-256 of the file's bytes. The folder of a cache is named by a hash of everything else that changes the features:
backbone name and weights, feature levels, prefix mode and grid, image transform, storage dtype, the code that
decodes, transforms and pools (this package's image processing module and the encoder's `visual_features` and
pooling), and the versions of the libraries they run on (torch, torchvision, timm, Pillow). Its files:

    features.npy    (rows, g*g, C) memory-mapped; row 0 holds the features of an all-zero image (absent images)
    index.json      {file SHA-256: row}, row -1 for a file that could not be decoded (it is masked)
    meta.json       the key, the shape and the SHA-256 of the two files above, written last

A cache whose `meta.json` is missing, or whose key or checksums do not match, is rebuilt (with a warning), never
read. A file lock lets one process build while others (`torchrun`, `accelerate launch`) wait and then read.
"""

import hashlib
import inspect
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import PIL
import timm
import torch
import torchvision
from filelock import FileLock
from tqdm.auto import tqdm

from . import image_processing_hvpnet
from .file_utils import atomic_write

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from .processing_hvpnet import HVPNetProcessor

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
# float16 halves the size; tests/test_feature_cache.py states how far the outputs then move.
STORAGE_DTYPES = {"float32": np.float32, "float16": np.float16}
ZERO_IMAGE_ROW = 0
UNREADABLE_ROW = -1


class VisualFeatureCache:
    """
    Cached `visual_features` of image files for one frozen backbone and one image transform.

    Args:
        model: an HVPNeT model (or `HVPNetModel`) whose backbone is frozen (`freeze_vision=True`).
        processor (`HVPNetProcessor`): the image transform and `num_object_images` of its image processor are used.
        cache_dir (`str` or `os.PathLike`): parent folder; each key gets its own sub-folder.
        dtype (`str`): `"float32"` (the pixel path's outputs exactly) or `"float16"` (half the size).
        missing_images (`str`): `"mask"` masks unreadable files (logged and counted in `num_unreadable`),
            `"error"` raises.
        batch_size (`int`): images per backbone call while building.
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
        self.image_processor = image_processor = processor.image_processor
        self.dtype = dtype
        self.missing_images = missing_images
        self.batch_size = batch_size
        config = base.config
        self.key = {
            "format": CACHE_FORMAT_VERSION,
            "backbone": config.vision_backbone,
            "backbone_weights_sha256": _state_dict_sha256(self.encoder.backbone),
            "vision_out_indices": list(config.vision_out_indices),
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
            },
        }
        key_hash = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:20]
        self.folder = Path(cache_dir) / key_hash
        self.num_unreadable = 0
        self._rows: dict[str, int] = {}  # file SHA-256 -> row
        self._path_hashes: dict[str, str] = {}  # path -> file SHA-256, "" for a file that cannot be read
        self._features: np.ndarray | None = None

    def build(self, paths: Iterable[str | os.PathLike | None]) -> "VisualFeatureCache":
        """Makes sure every readable file in `paths` has a row (computing only the missing ones), then opens the
        cache for reading. `None` entries (no image) are skipped."""
        unique_paths = sorted({str(path) for path in paths if path is not None})
        hashes = {path: _file_sha256(path, self.missing_images) for path in unique_paths}
        self.folder.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.folder / ".lock")):
            rows = self._read_index()
            missing = {}
            for path, file_hash in hashes.items():
                if file_hash and file_hash not in rows:
                    missing.setdefault(file_hash, path)
            if missing or not rows:
                rows = self._write(rows, missing)
        self._rows = rows
        self._path_hashes.update(hashes)
        self._features = np.load(self.folder / "features.npy", mmap_mode="r")
        for path, file_hash in hashes.items():
            if not file_hash or rows[file_hash] == UNREADABLE_ROW:
                logger.warning("Image %s is missing or unreadable; it is masked out.", path)
                self.num_unreadable += 1
        return self

    def row(self, path: str | os.PathLike | None) -> int:
        """The row of one image file: `ZERO_IMAGE_ROW` for no image, `UNREADABLE_ROW` for a file that could not be
        decoded. A path that `build` did not see is an error."""
        if path is None:
            return ZERO_IMAGE_ROW
        file_hash = self._path_hashes.get(str(path))
        if file_hash is None:
            raise KeyError(f"Image {path} is not in the feature cache {self.folder}; pass it to build() first")
        return self._rows.get(file_hash, UNREADABLE_ROW) if file_hash else UNREADABLE_ROW

    def example_features(
        self, image: str | os.PathLike | None, objects: Sequence[str | os.PathLike | None] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One example's `image_features` (1 + k, g*g, C), float32, and `image_features_mask` (1 + k,): the global
        image, then up to k = `num_object_images` crops. Absent or unreadable images hold the features of
        a zero image and are masked."""
        if self._features is None:
            raise RuntimeError("Call build() before reading from the feature cache")
        num_objects = self.image_processor.num_object_images
        slots = [image, *list(objects or [])[:num_objects]]
        slots += [None] * (1 + num_objects - len(slots))
        rows = [self.row(path) for path in slots]
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

    def _write(self, rows: dict[str, int], missing: dict[str, str]) -> dict[str, int]:
        """Writes a cache with the old rows plus features of the `missing` {file SHA-256: path}; meta.json last."""
        old_features = np.load(self.folder / "features.npy", mmap_mode="r") if rows else None
        size = self.image_processor.image_size
        zero_image = self._compute(torch.zeros(1, 3, size, size))
        num_old = len(old_features) if old_features is not None else 1  # a new cache starts with the zero image
        # Every missing file gets a row; the row of a file that cannot be decoded stays unused (index -1).
        shape = (num_old + len(missing), *zero_image.shape[1:])
        new_rows = dict(rows)
        items = list(missing.items())
        # features.npy and index.json replace the old ones only when both are written; meta.json, which holds their
        # checksums, is written last, so a cache interrupted at any point is rebuilt rather than read.
        with (
            atomic_write(self.folder / "features.npy") as features_temporary,
            atomic_write(self.folder / "index.json") as index_temporary,
        ):
            features = np.lib.format.open_memmap(
                features_temporary, mode="w+", dtype=STORAGE_DTYPES[self.dtype], shape=shape
            )
            features[:num_old] = old_features if old_features is not None else zero_image
            with tqdm(total=len(items), desc="Caching visual features", unit="image") as progress:
                for start in range(0, len(items), self.batch_size):
                    batch = items[start : start + self.batch_size]
                    decoded = [self.image_processor.image_tensor(path, self.missing_images) for _, path in batch]
                    computed = self._compute(torch.stack([pixels for pixels, _ in decoded]))
                    for offset, ((file_hash, _), (_, present)) in enumerate(zip(batch, decoded, strict=True)):
                        row = num_old + start + offset
                        features[row] = computed[offset] if present else zero_image[0]
                        new_rows[file_hash] = row if present else UNREADABLE_ROW
                    progress.update(len(batch))
            features.flush()
            del features, old_features
            index_temporary.write_text(json.dumps(new_rows), encoding="utf-8")
            meta = {
                "key": self.key,
                "shape": list(shape),
                "features_sha256": _file_sha256(features_temporary, "error"),
                "index_sha256": _file_sha256(index_temporary, "error"),
            }
        with atomic_write(self.folder / "meta.json") as meta_temporary:
            meta_temporary.write_text(json.dumps(meta, indent=2), encoding="utf-8")
        return new_rows

    def _compute(self, pixels: torch.Tensor) -> np.ndarray:
        """pixels (N, 3, S, S) → (N, g*g, C) features as the storage dtype."""
        device = next(self.encoder.parameters()).device
        with torch.no_grad():
            features = self.encoder.visual_features(pixels.to(device))
        return features.float().cpu().numpy().astype(STORAGE_DTYPES[self.dtype])


def _file_sha256(path: str | os.PathLike, missing_images: str) -> str:
    """SHA-256 of a file's bytes; "" for a file that cannot be read under `missing_images="mask"`."""
    try:
        with open(path, "rb") as file:
            return hashlib.file_digest(file, "sha256").hexdigest()
    except OSError as error:
        if missing_images == "error":
            raise OSError(f"Cannot read image {path}: {error}") from error
        return ""


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


__all__ = ["VisualFeatureCache"]
