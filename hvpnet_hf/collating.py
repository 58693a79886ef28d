"""
Glue between the loaders, `HVPNetProcessor` and a `Trainer` / `DataLoader`:

    dataset = load_mner_dataset(...)
    encoded = dataset.map(tokenize_and_align, batched=True, fn_kwargs={"processor": processor})
    encoded = encoded.with_transform(ImageAttacher(processor))   # optional: the collator can attach images too
    collator = HVPNetDataCollator(processor)

Token ids live in Arrow; pixels never do: images are decoded from the `image` / `objects` columns (paths, or
`datasets.Image()` values read undecoded, see `with_undecoded_images`) when a batch is drawn, or, with a
`VisualFeatureCache` (frozen backbone), their cached backbone features are read instead. With `Trainer`, set
`remove_unused_columns=False` so these columns reach the transform or collator.
"""

import dataclasses
from collections.abc import Mapping, Sequence

import datasets
import numpy as np
import torch
from datasets import Dataset, IterableDataset

from .feature_cache import VisualFeatureCache, check_decoding_policy, decoding_policy
from .image_processing_hvpnet import IMAGE_INPUT_NAMES, _check_policy, image_slots, is_absent_image
from .processing_hvpnet import HVPNetProcessor

# The columns of an example's images: `image` (one image or a list) and `objects` (the object crops).
IMAGE_COLUMNS = ("image", "objects")

MISSING_IMAGE_COLUMNS = (
    "Examples have neither image tensors nor the `image` / `objects` path columns to load them from; with Trainer, "
    "set remove_unused_columns=False so these columns are not dropped."
)


def tokenize_and_align(
    examples: Mapping[str, list], processor: HVPNetProcessor, max_length: int | None = None
) -> dict[str, list]:
    """
    Batched `datasets.map` function: tokenizes the `tokens` column and aligns the labels (`ner_tags` for NER,
    `relation` for RE, with `head` / `tail` spans) using the processor's task. Adds `input_ids`,
    `attention_mask`, `token_type_ids`, `labels` and, for NER, `word_start_mask` and `word_ids` (word index per
    token, -1 for special tokens; words absent from `word_ids` were cut by truncation and count as `"O"`).
    """
    if processor.task == "ner":
        return processor.encode_ner(examples["tokens"], examples.get("ner_tags"), max_length)
    return processor.encode_re(
        examples["tokens"], examples["head"], examples["tail"], examples.get("relation"), max_length
    )


class ImageAttacher:
    """
    Transform for `Dataset.with_transform`: decodes the `image` and `objects` values of the rows being read (paths,
    `datasets.Image()` values read undecoded, images in memory; `image` may list several images, see `image_slots`)
    and adds `pixel_values` (1 + k, 3, S, S), global image first, and `image_mask` (1 + k,) per row (see
    `HVPNetImageProcessor.preprocess_example`). Per process (with DataLoader workers each worker keeps its own), it
    counts the images given that could not be decoded and were masked (`num_masked`, each also logged by name), the
    rows read without a global image (`num_without_image`: None, "" or an empty value) and the images beyond a row's
    1 + k slots, dropped (`num_dropped`, each row logged).

    Images are decoded under PIL's decoding settings (`decoding_policy`) of the process that made the attacher: a
    process where they differ (a DataLoader worker started by spawn or forkserver, which does not inherit a raised
    `PIL.Image.MAX_IMAGE_PIXELS`) is refused with the setting named.
    """

    def __init__(self, processor: HVPNetProcessor, missing_images: str = "mask"):
        _check_policy(missing_images)
        self.processor = processor
        self.missing_images = missing_images
        self.decoding_policy = decoding_policy()
        self.num_masked = 0
        self.num_without_image = 0
        self.num_dropped = 0

    def __call__(self, batch: Mapping[str, list]) -> dict[str, list]:
        if "image" not in batch or "objects" not in batch:
            raise KeyError(MISSING_IMAGE_COLUMNS)
        check_decoding_policy(self.decoding_policy, "ImageAttacher")
        image_processor = self.processor.image_processor
        attached = {name: [] for name in IMAGE_INPUT_NAMES}
        for image, objects in zip(batch["image"], batch["objects"], strict=True):
            slots, num_dropped = image_slots(image, objects, image_processor.num_object_images)
            images = image_processor.preprocess_slots(slots, self.missing_images)
            self.num_dropped += num_dropped
            self.num_without_image += is_absent_image(slots[0][1])
            self.num_masked += sum(
                not is_absent_image(source) and not present
                for (_, source), present in zip(slots, images["image_mask"].tolist(), strict=True)
            )
            for name in IMAGE_INPUT_NAMES:
                attached[name].append(images[name])
        return {**batch, **attached}


def with_undecoded_images(dataset: Dataset | IterableDataset) -> Dataset | IterableDataset:
    """
    `dataset` with its `image` / `objects` columns of `datasets.Image()` features (or lists of them) cast to
    `Image(decode=False)` (`cast_column`), so that rows hold `{"bytes", "path"}` and `ImageAttacher`, the collator and
    the feature cache decode them with the package's policy (`load_image`), rather than `datasets` with its own (no
    masking of unreadable images, and downloads of remote paths). Other columns, and data sets whose features are
    unknown (an `IterableDataset` of a generator), are returned as they are. On an `IterableDataset`, a
    `rename_columns` (or any `map`) before the cast decodes every image of a row read and encodes it again: call
    `decode(False)` first, as `hvpnet_hf.data_sources` does (`select_columns` does not decode).
    """
    for column in IMAGE_COLUMNS:
        feature = (dataset.features or {}).get(column)
        undecoded = _undecoded(feature)
        if undecoded != feature:
            dataset = dataset.cast_column(column, undecoded)
    return dataset


def _undecoded(feature):
    """An `Image()` feature, or a list feature of them, with `decode=False`; any other feature as it is."""
    if isinstance(feature, datasets.Image):
        return dataclasses.replace(feature, decode=False)
    if isinstance(feature, (datasets.Sequence, datasets.LargeList)):
        return dataclasses.replace(feature, feature=_undecoded(feature.feature))
    return feature


class HVPNetDataCollator:
    """
    Pads and stacks encoded examples into model inputs: `input_ids` (padded with the tokenizer's pad id),
    `attention_mask`, `token_type_ids` (B, T), NER `word_start_mask` (B, T) and `labels` (B, T, padded with -100)
    or RE `labels` (B,), and the image tensors. Examples without attached images get them from their `image` /
    `objects` values here (counted by `self.attacher`, an `ImageAttacher`). Columns that are not model inputs (`tokens`, `id`, `word_ids`, ...) are dropped.

    With a built `feature_cache`, the image inputs are `image_features` (B, 1 + k, g*g, C) and `image_features_mask`
    (B, 1 + k) read from the cache by the `image` / `objects` values (paths or `Image()` values), instead of pixels; the cache decoded them, so its
    `missing_images` must be the collator's.
    """

    def __init__(
        self,
        processor: HVPNetProcessor,
        missing_images: str = "mask",
        feature_cache: VisualFeatureCache | None = None,
    ):
        if feature_cache is not None and feature_cache.missing_images != missing_images:
            raise ValueError(
                f"The collator's missing_images={missing_images!r} differs from its feature cache's "
                f"missing_images={feature_cache.missing_images!r}, which decided how unreadable images are handled"
            )
        self.processor = processor
        self.attacher = ImageAttacher(processor, missing_images)
        self.feature_cache = feature_cache

    def __call__(self, features: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        if self.feature_cache is not None:
            return dict(self.processor.pad([self._with_cached_features(feature) for feature in features]))
        return dict(self.processor.pad([self._with_images(feature) for feature in features]))

    def _with_cached_features(self, feature: Mapping) -> Mapping:
        if "image" not in feature:
            raise KeyError(MISSING_IMAGE_COLUMNS)
        image_features, image_features_mask = self.feature_cache.example_features(
            feature["image"], feature.get("objects")
        )
        return {**feature, "image_features": image_features, "image_features_mask": image_features_mask}

    def _with_images(self, feature: Mapping) -> Mapping:
        if "pixel_values" in feature:
            return feature
        if "image" not in feature:
            raise KeyError(MISSING_IMAGE_COLUMNS)
        columns = {name: [value] for name, value in feature.items()}
        columns.setdefault("objects", [[]])
        return {name: values[0] for name, values in self.attacher(columns).items()}


def sample_subset(dataset: Dataset, sample_ratio: float, seed: int = 42) -> Dataset:
    """
    A reproducible random subset of `round(sample_ratio * len(dataset))` examples (at least one), in the original
    order, for low-resource experiments. The subsets of one seed are nested: a smaller ratio draws a part of a larger
    one's subset. `sample_ratio=1.0` returns the dataset unchanged.
    """
    if not 0.0 < sample_ratio <= 1.0:
        raise ValueError(f"sample_ratio must be in (0, 1], got {sample_ratio}")
    if sample_ratio == 1.0:
        return dataset
    size = max(1, round(sample_ratio * len(dataset)))
    # The first `size` entries of one seeded permutation, so that subsets of increasing ratios are nested.
    indices = np.sort(np.random.default_rng(seed).permutation(len(dataset))[:size])
    return dataset.select(indices)


__all__ = ["HVPNetDataCollator", "ImageAttacher", "sample_subset", "tokenize_and_align", "with_undecoded_images"]
