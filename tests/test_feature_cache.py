"""The visual feature cache: same outputs as the pixel path, reuse, damage and key changes, float16 storage, embedded
`Image()` values and posts with several images."""

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import PIL
import pytest
import torch
from datasets import Dataset, Features, List, Value
from datasets import Image as ImageFeature
from PIL import Image, ImageFile, PngImagePlugin, TiffImagePlugin, features
from transformers import BertTokenizer

from hvpnet_hf import HVPNetConfig, HVPNetForTokenClassification, image_processing_hvpnet
from hvpnet_hf.collating import HVPNetDataCollator, with_undecoded_images
from hvpnet_hf.feature_cache import VisualFeatureCache, build_feature_cache
from hvpnet_hf.processing_hvpnet import HVPNetProcessor

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "kevin", "durant", "in", "boston"]
# 64 px keeps every test_resnet stage at least 2x2, which prefix_mode="original" needs for its pooling.
IMAGE_SIZE = 64
# float32 features are the pixel path's features; only the order of summation in batched kernels may differ.
FLOAT32_ATOL = 1e-5


def tiny_processor(image_size: int = IMAGE_SIZE) -> HVPNetProcessor:
    tokenizer = BertTokenizer(vocab={token: index for index, token in enumerate(VOCAB)})
    return HVPNetProcessor(tokenizer, image_size=image_size, num_object_images=2, max_length=12)


def tiny_model(**overrides) -> HVPNetForTokenClassification:
    text = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 37}
    text.update(vocab_size=len(VOCAB), max_position_embeddings=32)
    config = HVPNetConfig(
        text_config=text, vision_backbone="test_resnet", num_object_images=2, num_labels=3, **overrides
    )
    torch.manual_seed(0)
    return HVPNetForTokenClassification(config).eval()


@pytest.fixture(scope="module")
def examples(tmp_path_factory) -> list[dict]:
    """Four encoded examples: random images of several sizes, a truncated file, a missing crop, no image at all."""
    folder = tmp_path_factory.mktemp("images")
    generator = np.random.default_rng(0)
    for name, size in (("a.png", (50, 40)), ("b.jpg", (64, 80)), ("c.png", (30, 30)), ("d.png", (90, 70))):
        pixels = generator.integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)
    (folder / "broken.jpg").write_bytes((folder / "b.jpg").read_bytes()[:-300])
    paths = [
        (folder / "a.png", [folder / "c.png", folder / "d.png"]),
        (folder / "broken.jpg", [folder / "a.png"]),
        (None, [folder / "missing.png", folder / "b.jpg"]),
        (folder / "d.png", []),
    ]
    encoded = tiny_processor().encode_ner([["kevin", "durant", "in", "boston"]] * 4, [[1, 2, 0, 1]] * 4)
    return [
        {
            **{name: values[index] for name, values in encoded.items()},
            "image": None if image is None else str(image),
            "objects": [str(crop) for crop in objects],
        }
        for index, (image, objects) in enumerate(paths)
    ]


def image_paths(examples: list[dict]) -> list[str | None]:
    return [path for example in examples for path in (example["image"], *example["objects"])]


def logits(model: HVPNetForTokenClassification, collator: HVPNetDataCollator, examples: list[dict]) -> torch.Tensor:
    batch = collator(examples)
    batch.pop("labels")
    with torch.no_grad():
        return model(**batch).logits


def assert_pixel_path_features(model: HVPNetForTokenClassification, cache: VisualFeatureCache, examples: list[dict]):
    """The cache serves what the encoder makes of the pixel path's images (the logits of the tiny models move by
    only about 1e-4 when every feature is zeroed, so they alone would not show a small error in the features)."""
    processor = tiny_processor()
    pixels = HVPNetDataCollator(processor)(examples)
    cached = HVPNetDataCollator(processor, feature_cache=cache)(examples)
    with torch.no_grad():
        features = model.hvpnet.visual_encoder.visual_features(pixels["pixel_values"].flatten(0, 1))
    torch.testing.assert_close(
        cached["image_features"], features.unflatten(0, (len(examples), -1)), atol=FLOAT32_ATOL, rtol=0
    )
    assert torch.equal(cached["image_features_mask"], pixels["image_mask"])


@pytest.mark.parametrize("prefix_mode", ["pyramid", "flat", "one_to_three", "original"])
def test_cached_features_give_the_outputs_of_the_pixel_path(examples, tmp_path, prefix_mode):
    model, processor = tiny_model(prefix_mode=prefix_mode), tiny_processor()
    cache = VisualFeatureCache(model, processor, tmp_path).build(image_paths(examples))
    assert cache.num_unreadable == 2  # the truncated file and the missing crop
    assert_pixel_path_features(model, cache, examples)
    from_pixels = logits(model, HVPNetDataCollator(processor), examples)
    from_cache = logits(model, HVPNetDataCollator(processor, feature_cache=cache), examples)
    torch.testing.assert_close(from_cache, from_pixels, atol=FLOAT32_ATOL, rtol=0)


def test_float16_storage_stays_within_its_tolerance(examples, tmp_path):
    model, processor = tiny_model(), tiny_processor()
    cache = VisualFeatureCache(model, processor, tmp_path, dtype="float16").build(image_paths(examples))
    assert np.load(cache.folder / "features.npy", mmap_mode="r").dtype == np.float16
    from_pixels = logits(model, HVPNetDataCollator(processor), examples)
    from_cache = logits(model, HVPNetDataCollator(processor, feature_cache=cache), examples)
    # float16 keeps 11 significant bits (relative error <= 2**-11 ~ 5e-4 per feature); the prefix layers average
    # many features, so the logits move by about that share of their size.
    torch.testing.assert_close(from_cache, from_pixels, atol=1e-3 * from_pixels.abs().max().item(), rtol=0)
    assert not torch.equal(from_cache, from_pixels), "float16 storage is expected to round"


def count_backbone_images(model: HVPNetForTokenClassification) -> list[int]:
    seen = []
    model.hvpnet.visual_encoder.backbone.register_forward_hook(lambda module, args, output: seen.append(len(args[0])))
    return seen


def test_a_built_cache_is_reused_and_grows_by_new_files_only(examples, tmp_path):
    model, processor = tiny_model(), tiny_processor()
    first_paths = [examples[0]["image"], *examples[0]["objects"]]  # a.png, c.png, d.png
    VisualFeatureCache(model, processor, tmp_path).build(first_paths)
    seen = count_backbone_images(model)
    VisualFeatureCache(model, processor, tmp_path).build(first_paths)
    assert seen == [], "a complete cache is read, not recomputed"
    cache = VisualFeatureCache(model, processor, tmp_path).build(image_paths(examples))
    assert sum(seen) == 1, "b.jpg only: the truncated file is decoded, found unreadable and given no row"
    from_pixels = logits(model, HVPNetDataCollator(processor), examples)
    from_cache = logits(model, HVPNetDataCollator(processor, feature_cache=cache), examples)
    torch.testing.assert_close(from_cache, from_pixels, atol=FLOAT32_ATOL, rtol=0)
    files = {name: (cache.folder / name).stat().st_mtime_ns for name in ("features.npy", "index.json", "meta.json")}
    seen.clear()
    again = VisualFeatureCache(model, processor, tmp_path).build(image_paths(examples))
    assert seen == [] and again.num_unreadable == 2, "the truncated file is tried again, and stays masked"
    assert {name: (cache.folder / name).stat().st_mtime_ns for name in files} == files, "nothing new to write"


def test_an_interrupted_build_keeps_the_earlier_cache_and_leaves_no_partial_files(examples, tmp_path, monkeypatch):
    model, processor = tiny_model(), tiny_processor()
    first_paths = [examples[0]["image"], *examples[0]["objects"]]
    folder = VisualFeatureCache(model, processor, tmp_path).build(first_paths).folder
    files = ("features.npy", "index.json", "meta.json")
    before = {name: (folder / name).read_bytes() for name in files}
    compute, calls = VisualFeatureCache._compute, []

    def compute_then_stop(self, pixels):
        calls.append(len(pixels))
        if len(calls) == 1:  # the first batch of new files (the cache has its zero image already)
            raise KeyboardInterrupt
        return compute(self, pixels)

    monkeypatch.setattr(VisualFeatureCache, "_compute", compute_then_stop)
    with pytest.raises(KeyboardInterrupt):
        VisualFeatureCache(model, processor, tmp_path).build(image_paths(examples))
    assert {name: (folder / name).read_bytes() for name in files} == before
    assert {path.name for path in folder.iterdir()} - {".lock"} == set(files)  # no temporary file left behind
    monkeypatch.setattr(VisualFeatureCache, "_compute", compute)
    seen = count_backbone_images(model)
    VisualFeatureCache(model, processor, tmp_path).build(first_paths)
    assert seen == [], "the earlier cache is still valid and read"


@pytest.mark.parametrize("damage", ["flip_feature_byte", "drop_meta", "edit_index"])
def test_a_damaged_cache_is_rebuilt_not_read(examples, tmp_path, caplog, damage):
    model, processor = tiny_model(), tiny_processor()
    paths = image_paths(examples)
    folder = VisualFeatureCache(model, processor, tmp_path).build(paths).folder
    if damage == "flip_feature_byte":
        data = bytearray((folder / "features.npy").read_bytes())
        data[-5] ^= 0xFF
        (folder / "features.npy").write_bytes(bytes(data))
    elif damage == "drop_meta":
        (folder / "meta.json").unlink()
    else:
        rows = json.loads((folder / "index.json").read_text())
        first = next(iter(rows))
        rows[first] = 1 if rows[first] != 1 else 2
        (folder / "index.json").write_text(json.dumps(rows))
    seen = count_backbone_images(model)
    with caplog.at_level(logging.WARNING, logger="hvpnet_hf.feature_cache"):
        cache = VisualFeatureCache(model, processor, tmp_path).build(paths)
    assert sum(seen) > 0, "the damaged cache is computed again"
    if damage != "drop_meta":
        assert any("is rebuilt" in record.getMessage() for record in caplog.records)
    from_pixels = logits(model, HVPNetDataCollator(processor), examples)
    from_cache = logits(model, HVPNetDataCollator(processor, feature_cache=cache), examples)
    torch.testing.assert_close(from_cache, from_pixels, atol=FLOAT32_ATOL, rtol=0)


def test_a_file_that_failed_to_decode_is_read_by_the_next_build(examples, tmp_path, monkeypatch):
    model, processor = tiny_model(), tiny_processor()
    paths = [examples[0]["image"], *examples[0]["objects"]]  # a.png, c.png, d.png
    load_image = image_processing_hvpnet.load_image

    def flaky_load_image(path):  # a read error that passes (on a network file system, say) on d.png
        if path.endswith("d.png"):
            raise OSError(f"Cannot read image {path}: timed out")
        return load_image(path)

    with monkeypatch.context() as patch:
        patch.setattr(image_processing_hvpnet, "load_image", flaky_load_image)
        first = VisualFeatureCache(model, processor, tmp_path).build(paths)
    assert first.num_unreadable == 1
    cache = VisualFeatureCache(model, processor, tmp_path).build(paths)
    assert cache.folder == first.folder and cache.num_unreadable == 0
    assert_pixel_path_features(model, cache, examples[:1])


# The 64 x 64 crop of the transform is over the lowered limit too (a warning only).
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_an_image_over_the_pixel_limit_is_read_once_the_limit_is_raised(examples, tmp_path, monkeypatch):
    model, processor = tiny_model(), tiny_processor()
    paths = [examples[0]["image"], *examples[0]["objects"]]  # a.png (2,000 pixels), c.png (900), d.png (6,300)
    with monkeypatch.context() as patch:
        patch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # PIL refuses images over twice the limit: d.png
        refused = VisualFeatureCache(model, processor, tmp_path).build(paths)
        assert refused.num_unreadable == 1
        assert not HVPNetDataCollator(processor, feature_cache=refused)(examples[:1])["image_features_mask"].all()
    cache = VisualFeatureCache(model, processor, tmp_path).build(paths)  # the default limit again
    assert cache.num_unreadable == 0
    assert_pixel_path_features(model, cache, examples[:1])


def test_load_truncated_images_gets_a_cache_of_its_own(examples, tmp_path, monkeypatch):
    model, processor = tiny_model(), tiny_processor()
    paths = [examples[1]["image"], *examples[1]["objects"]]  # broken.jpg (truncated), a.png
    strict = VisualFeatureCache(model, processor, tmp_path).build(paths)
    assert strict.num_unreadable == 1
    with monkeypatch.context() as patch:
        patch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # PIL decodes what is there, the rest gray
        lenient = VisualFeatureCache(model, processor, tmp_path).build(paths)
        assert lenient.folder != strict.folder and lenient.num_unreadable == 0
        assert_pixel_path_features(model, lenient, examples[1:2])
    again = VisualFeatureCache(model, processor, tmp_path).build(paths)  # strict again: the features are not served
    assert again.folder == strict.folder and again.num_unreadable == 1
    assert_pixel_path_features(model, again, examples[1:2])


@contextlib.contextmanager
def cpu_convolutions_in_bfloat16() -> Iterator[None]:
    """torch's process-wide setting for float32 CPU (oneDNN) convolutions computed in bfloat16, within the block
    (monkeypatch cannot restore it: the setting is read through `__getattr__`)."""
    setting = torch.backends.mkldnn.conv
    before, setting.fp32_precision = setting.fp32_precision, "bf16"
    try:
        yield
    finally:
        setting.fp32_precision = before


def test_a_setting_changed_between_making_and_building_the_cache_is_refused(examples, tmp_path, monkeypatch):
    cache = VisualFeatureCache(tiny_model(), tiny_processor(), tmp_path)
    with monkeypatch.context() as patch:
        patch.setattr(Image, "MAX_IMAGE_PIXELS", None)
        with pytest.raises(ValueError, match="PIL.Image.MAX_IMAGE_PIXELS is None here but was"):
            cache.build(image_paths(examples))
    with cpu_convolutions_in_bfloat16(), pytest.raises(ValueError, match="'mkldnn.conv.fp32_precision': 'bf16'"):
        cache.build(image_paths(examples))
    assert not cache.folder.exists(), "refused before any work"


def test_features_built_under_autocast_are_the_backbones_own(examples, tmp_path):
    model, processor = tiny_model(), tiny_processor()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cache = VisualFeatureCache(model, processor, tmp_path).build(image_paths(examples))
    assert_pixel_path_features(model, cache, examples)


def test_the_key_follows_weights_transform_grid_and_mode(tmp_path):
    processor = tiny_processor()
    folder = VisualFeatureCache(tiny_model(), processor, tmp_path).folder
    changed_weights = tiny_model()
    with torch.no_grad():
        next(changed_weights.hvpnet.visual_encoder.backbone.parameters())[0].add_(1e-3)
    others = [
        VisualFeatureCache(changed_weights, processor, tmp_path),
        VisualFeatureCache(tiny_model(), tiny_processor(image_size=48), tmp_path),
        VisualFeatureCache(tiny_model(prefix_grid=1), processor, tmp_path),
        VisualFeatureCache(tiny_model(prefix_mode="original"), processor, tmp_path),
        VisualFeatureCache(tiny_model(vision_out_indices=[-2, -1]), processor, tmp_path),
        VisualFeatureCache(tiny_model(), processor, tmp_path, dtype="float16"),
    ]
    assert len({folder, *(cache.folder for cache in others)}) == 1 + len(others)
    assert VisualFeatureCache(tiny_model(), tiny_processor(), tmp_path).folder == folder


def test_the_key_follows_the_pooling_code_the_libraries_and_the_process_settings(tmp_path, monkeypatch):
    folder = VisualFeatureCache(tiny_model(), tiny_processor(), tmp_path).folder
    model = tiny_model()
    encoder_class = type(model.hvpnet.visual_encoder)
    original_pooling = encoder_class.pool_feature_maps

    def pool_feature_maps(self, feature_maps):  # the same pooling, written otherwise
        return original_pooling(self, feature_maps)

    with monkeypatch.context() as patch:
        patch.setattr(encoder_class, "pool_feature_maps", pool_feature_maps)
        assert VisualFeatureCache(model, tiny_processor(), tmp_path).folder != folder
    changes = [
        (PIL, "__version__", "0.0.1"),
        (features, "version", lambda name: "0.0.1"),  # another libjpeg, zlib, ...
        (TiffImagePlugin, "READ_LIBTIFF", True),
        (PngImagePlugin, "MAX_TEXT_CHUNK", 1),
    ]
    for module, name, value in changes:
        with monkeypatch.context() as patch:
            patch.setattr(module, name, value)
            assert VisualFeatureCache(model, tiny_processor(), tmp_path).folder != folder, name
    with cpu_convolutions_in_bfloat16():
        assert VisualFeatureCache(model, tiny_processor(), tmp_path).folder != folder
    assert VisualFeatureCache(model, tiny_processor(), tmp_path).folder == folder


def test_unfrozen_backbones_unknown_policies_and_unknown_files_are_refused(examples, tmp_path):
    with pytest.raises(ValueError, match="frozen backbone"):
        VisualFeatureCache(tiny_model(freeze_vision=False), tiny_processor(), tmp_path)
    with pytest.raises(ValueError, match="missing_images must be one of"):
        VisualFeatureCache(tiny_model(), tiny_processor(), tmp_path, missing_images="Mask")
    cache = VisualFeatureCache(tiny_model(), tiny_processor(), tmp_path).build([examples[0]["image"]])
    with pytest.raises(KeyError, match="not in the feature cache"):
        HVPNetDataCollator(tiny_processor(), feature_cache=cache)(examples)


def test_image_features_of_the_wrong_shape_or_with_pixels_are_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="image_features must have shape"):
        model.hvpnet(input_ids=torch.tensor([[2, 5, 3]]), image_features=torch.zeros(1, 2, 4, 8))
    features = torch.zeros(1, 3, 4, 8)
    with pytest.raises(ValueError, match="image_features_mask must have shape"):
        model.hvpnet(
            input_ids=torch.tensor([[2, 5, 3]]), image_features=features, image_features_mask=torch.ones(1, 2)
        )
    with pytest.raises(ValueError, match="not both"):
        model.hvpnet(
            input_ids=torch.tensor([[2, 5, 3]]), image_features=features, pixel_values=torch.zeros(1, 3, 3, 32, 32)
        )


# ---------------------------------------------------------------- images as data: Image() values, several images


def embedded(example: dict) -> dict:
    """The example with its image files embedded as `datasets.Image()` values (bytes, and only the file's name); a
    missing file stays a value of its path alone."""

    def value(path: str | None) -> dict | None:
        if path is None or not Path(path).exists():
            return path and {"bytes": None, "path": path}
        return {"bytes": Path(path).read_bytes(), "path": Path(path).name}

    return {**example, "image": value(example["image"]), "objects": [value(path) for path in example["objects"]]}


def test_embedded_images_share_the_rows_of_their_files(examples, tmp_path):
    model, processor = tiny_model(), tiny_processor()
    from_files = VisualFeatureCache(model, processor, tmp_path).build(image_paths(examples))
    seen = count_backbone_images(model)
    images = [embedded(example) for example in examples]
    cache = VisualFeatureCache(model, processor, tmp_path).build(image_paths(images))
    assert seen == [], "the bytes are the files' bytes: their rows are found by the same SHA-256"
    assert cache.num_unreadable == 2  # the truncated bytes (tried again, and masked) and the missing crop's file
    assert_pixel_path_features(model, cache, images)
    from_paths = HVPNetDataCollator(processor, feature_cache=from_files)(examples)
    from_images = HVPNetDataCollator(processor, feature_cache=cache)(images)
    for name in ("image_features", "image_features_mask"):
        assert torch.equal(from_images[name], from_paths[name])


def test_a_data_set_of_image_features_and_posts_with_several_images_is_cached(examples, tmp_path):
    model, processor = tiny_model(), tiny_processor()
    features = Features(
        {"image": List(ImageFeature()), "objects": List(ImageFeature()), "input_ids": List(Value("int64"))}
    )
    # The first post has its three pictures and crops, the others one picture each; decoded on read by datasets.
    posts = [[path for path in image_paths(examples[:1]) if path]] + [[example["image"]] for example in examples[2:]]
    rows = {
        "image": [[embedded({"image": path, "objects": []})["image"] for path in post] for post in posts],
        "objects": [[], *(embedded(example)["objects"] for example in examples[2:])],
        "input_ids": [example["input_ids"] for example in examples[:1] + examples[2:]],
    }
    data = Dataset.from_dict(rows, features=features)
    cache = build_feature_cache(model, processor, [data], cache_dir=tmp_path)
    assert cache.num_unreadable == 1  # the missing crop's file
    undecoded = with_undecoded_images(data)
    for row in undecoded:
        cached, present = cache.example_features(row["image"], row["objects"])
        pixels = processor.image_processor.preprocess_example(row["image"], row["objects"])
        with torch.no_grad():
            expected = model.hvpnet.visual_encoder.visual_features(pixels["pixel_values"])
        torch.testing.assert_close(cached, expected, atol=FLOAT32_ATOL, rtol=0)
        assert torch.equal(present, pixels["image_mask"])


def test_urls_and_images_in_memory_are_refused_before_any_image_is_decoded(examples, tmp_path):
    model, processor = tiny_model(), tiny_processor()
    cache = VisualFeatureCache(model, processor, tmp_path)
    seen = count_backbone_images(model)
    with pytest.raises(ValueError, match=r"is a URL \(https://example.com/a.png\)"):
        cache.build([*image_paths(examples), "https://example.com/a.png"])
    with pytest.raises(TypeError, match="reads images from files or datasets Image"):
        cache.build([*image_paths(examples), Image.new("RGB", (8, 8))])
    assert seen == []
