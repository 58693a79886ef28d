"""From published files and `datasets` data sets to model inputs: map function, lazy image transform, collator (paths,
`Image()` columns, posts with several images), subsets, a model forward."""

import logging

import pytest
import torch
from datasets import Dataset, Features, List, Value
from datasets import Image as ImageFeature
from PIL import Image
from torch.utils.data import DataLoader
from transformers import BertTokenizer

from hvpnet_hf import HVPNetConfig, HVPNetForSequenceClassification, HVPNetForTokenClassification
from hvpnet_hf.collating import (
    HVPNetDataCollator,
    ImageAttacher,
    sample_subset,
    tokenize_and_align,
    with_undecoded_images,
)
from hvpnet_hf.feature_cache import VisualFeatureCache
from hvpnet_hf.loading import MNER_LABELS, load_mner_dataset, load_mre_dataset
from hvpnet_hf.metrics import align_word_predictions
from hvpnet_hf.processing_hvpnet import HVPNetProcessor

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "kevin", "du", "##rant", "in", "boston", "apple", "store"]
IMAGE_SIZE = 32
NER_INPUTS = {
    "input_ids",
    "attention_mask",
    "token_type_ids",
    "word_start_mask",
    "labels",
    "pixel_values",
    "image_mask",
}
RE_INPUTS = NER_INPUTS - {"word_start_mask"}


def tiny_processor(task: str = "ner") -> HVPNetProcessor:
    tokenizer = BertTokenizer(vocab={token: index for index, token in enumerate(VOCAB)})
    return HVPNetProcessor(tokenizer, task=task, image_size=IMAGE_SIZE, num_object_images=2, max_length=12)


def tiny_model_config(**overrides) -> HVPNetConfig:
    text = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37}
    text.update(vocab_size=len(VOCAB) + 4, max_position_embeddings=32)
    return HVPNetConfig(text_config=text, vision_backbone="test_resnet", num_object_images=2, **overrides)


@pytest.fixture
def mner_dir(tmp_path):
    """Four tweets in the UMT format; one image is truncated after its header, one crop map keyed by file name."""
    text = (
        "IMGID:1\nKevin\tB-PER\nDurant\tI-PER\nin\tO\nBoston\tB-LOC\n\n"
        "IMGID:2\nApple\tB-ORG\nstore\tO\n\n"
        "IMGID:3\n\x07\tO\nBoston\tB-LOC\n\n"
        "IMGID:4\n" + "".join("in\tO\n" for _ in range(20))  # longer than max_length: truncated
    )
    (tmp_path / "train.txt").write_text(text, encoding="utf-8")
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(images / "1.jpg")
    Image.new("CMYK", (30, 40)).save(images / "2.jpg")
    Image.frombytes("RGB", (64, 64), bytes(range(256)) * 48).save(images / "3.jpg")
    (images / "3.jpg").write_bytes((images / "3.jpg").read_bytes()[:-400])
    crops = tmp_path / "crops"
    crops.mkdir()
    Image.new("RGBA", (10, 10)).save(crops / "1_0.png")
    Image.new("P", (10, 10)).save(crops / "1_1.png")
    Image.new("L", (10, 10)).save(crops / "1_2.png")
    return load_mner_dataset(
        data_files={"train": tmp_path / "train.txt"},
        image_dir=images,
        object_dir=crops,
        object_maps={"train": {"1.jpg": ["1_0.png", "1_1.png", "1_2.png"]}},
    )


def test_map_keeps_every_example_and_stores_no_pixels(mner_dir):
    processor = tiny_processor()
    encoded = mner_dir.map(tokenize_and_align, batched=True, fn_kwargs={"processor": processor})["train"]
    assert len(encoded) == len(mner_dir["train"]) == 4
    float_columns = [name for name, feature in encoded.features.items() if "float" in str(feature)]
    assert float_columns == []
    assert encoded.features["image"] == Value("string")
    # The truncated tweet keeps 10 of its 20 words; the rest are countable from word_ids.
    assert len(encoded[3]["input_ids"]) == 12
    assert len(set(encoded[3]["word_ids"]) - {-1}) == 10
    # The control-character word became [UNK] and kept its label slot.
    assert [label for label in encoded[2]["labels"] if label != -100] == [0, MNER_LABELS.index("B-LOC")]


def test_lazy_transform_and_collator_build_model_inputs(mner_dir):
    processor = tiny_processor()
    encoded = mner_dir.map(tokenize_and_align, batched=True, fn_kwargs={"processor": processor})["train"]
    attacher = ImageAttacher(processor)
    loader = DataLoader(encoded.with_transform(attacher), batch_size=4, collate_fn=HVPNetDataCollator(processor))
    batch = next(iter(loader))

    assert set(batch) == NER_INPUTS
    assert batch["input_ids"].shape == batch["labels"].shape == batch["word_start_mask"].shape == (4, 12)
    # One stack per example: the global image in slot 0, then the two crop slots.
    assert batch["pixel_values"].shape == (4, 3, 3, IMAGE_SIZE, IMAGE_SIZE)
    # 3.jpg passes the header check at load time but cannot be decoded: masked and counted; 4.jpg never existed.
    assert batch["image_mask"].tolist() == [[True, True, True], [True, False, False], [False] * 3, [False] * 3]
    assert attacher.num_masked == 1
    # Padding: the two-word tweet is [CLS] apple store [SEP] + 8 pads.
    assert batch["input_ids"][1, 4:].tolist() == [processor.tokenizer.pad_token_id] * 8
    assert batch["labels"][1, 4:].tolist() == [-100] * 8
    assert not batch["word_start_mask"][1, 4:].any()
    assert batch["attention_mask"][1].tolist() == [1] * 4 + [0] * 8


def test_collator_attaches_images_itself_and_refuses_dropped_paths(mner_dir):
    processor = tiny_processor()
    encoded = mner_dir.map(tokenize_and_align, batched=True, fn_kwargs={"processor": processor})["train"]
    collator = HVPNetDataCollator(processor)
    from_paths = collator([encoded[0], encoded[1]])
    transformed = encoded.with_transform(ImageAttacher(processor))
    from_transform = collator([transformed[0], transformed[1]])
    for name in NER_INPUTS:
        torch.testing.assert_close(from_paths[name], from_transform[name], rtol=0, atol=0)  # same decode, same tensors
    without_paths = encoded.remove_columns(["image", "objects"])  # what Trainer's remove_unused_columns does
    with pytest.raises(KeyError, match="remove_unused_columns=False"):
        collator([without_paths[0]])
    with pytest.raises(KeyError, match="remove_unused_columns=False"):
        without_paths.with_transform(ImageAttacher(processor))[0]


def test_policies_are_checked_when_the_collator_is_made(mner_dir, tmp_path):
    processor = tiny_processor()
    with pytest.raises(ValueError, match="missing_images must be one of"):
        ImageAttacher(processor, missing_images="Mask")
    model = HVPNetForTokenClassification(tiny_model_config(num_labels=len(MNER_LABELS)))
    cache = VisualFeatureCache(model, processor, tmp_path, missing_images="mask")
    # The cache masks unreadable files; a collator asked to raise would pass them on masked.
    with pytest.raises(ValueError, match="missing_images='error' differs from its feature cache's"):
        HVPNetDataCollator(processor, missing_images="error", feature_cache=cache)


def test_images_are_decoded_under_the_pil_settings_of_the_process_that_made_the_attacher(mner_dir, monkeypatch):
    processor = tiny_processor()
    encoded = mner_dir.map(tokenize_and_align, batched=True, fn_kwargs={"processor": processor})["train"]
    with monkeypatch.context() as patch:
        patch.setattr(Image, "MAX_IMAGE_PIXELS", 10**10)  # raised in the main process
        collator = HVPNetDataCollator(processor)
        assert collator([encoded[0]])["image_mask"].all()
    # A DataLoader worker that was not forked starts with PIL's default limit.
    with pytest.raises(
        ValueError, match=f"PIL.Image.MAX_IMAGE_PIXELS is {Image.MAX_IMAGE_PIXELS} here but was 10000000000 where"
    ):
        collator([encoded[0]])


def test_batches_run_through_the_models(mner_dir, tmp_path):
    torch.manual_seed(0)
    processor = tiny_processor()
    encoded = mner_dir.map(tokenize_and_align, batched=True, fn_kwargs={"processor": processor})["train"]
    batch = HVPNetDataCollator(processor)(list(encoded))
    model = HVPNetForTokenClassification(tiny_model_config(num_labels=len(MNER_LABELS))).eval()
    with torch.no_grad():
        output = model(**batch)
    assert torch.isfinite(output.loss)
    tags = model.decode(output.logits, batch["word_start_mask"])
    assert ((tags != -100) == batch["word_start_mask"]).all()
    gold = [[MNER_LABELS[tag] for tag in example_tags] for example_tags in encoded["ner_tags"]]
    id2label = dict(enumerate(MNER_LABELS))
    words, _, num_cut = align_word_predictions(tags.numpy(), batch["labels"].numpy(), gold, id2label)
    assert len(words[3]) == 20 and words[3][10:] == ["O"] * 10 and num_cut == 10  # cut words scored as "O"

    mre_file = tmp_path / "mnre_train.txt"
    records = [
        {
            "token": ["Kevin", "in", "Boston"],
            "h": {"name": "Kevin", "pos": [0, 1]},
            "t": {"name": "Boston", "pos": [2, 3]},
        },
        {"token": ["Apple", "store"], "h": {"name": "Apple", "pos": [0, 1]}, "t": {"name": "store", "pos": [1, 2]}},
    ]
    records[0].update(img_id="x.jpg", relation="/per/loc/place_of_residence")
    records[1].update(img_id="y.jpg", relation="None")
    mre_file.write_text("\n".join(repr(record) for record in records))  # one Python literal per line
    relations = load_mre_dataset(data_files={"train": mre_file})["train"]
    re_processor = tiny_processor("re")
    encoded = relations.map(tokenize_and_align, batched=True, fn_kwargs={"processor": re_processor})
    batch = HVPNetDataCollator(re_processor)(list(encoded))
    assert set(batch) == RE_INPUTS
    assert batch["labels"].tolist() == [1, 0] and not batch["image_mask"].any()
    config = tiny_model_config(
        num_labels=2,
        head_start_token_id=re_processor.head_start_token_id,
        tail_start_token_id=re_processor.tail_start_token_id,
    )
    with torch.no_grad():
        logits = HVPNetForSequenceClassification(config).eval()(**batch).logits
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()


def test_sample_subset_is_reproducible():
    dataset = Dataset.from_dict({"id": [str(index) for index in range(100)]})
    first = sample_subset(dataset, 0.1, seed=3)["id"]
    assert len(first) == 10 and first == sorted(first, key=int)  # original order kept
    assert sample_subset(dataset, 0.1, seed=3)["id"] == first
    assert sample_subset(dataset, 0.1, seed=4)["id"] != first
    assert len(sample_subset(dataset, 0.001)) == 1
    assert sample_subset(dataset, 1.0) is dataset
    with pytest.raises(ValueError, match="sample_ratio"):
        sample_subset(dataset, 0.0)


# ---------------------------------------------------------------- images as data: datasets Image() columns, lists

IMAGE_FEATURES = Features(
    {
        "tokens": List(Value("string")),
        "ner_tags": List(Value("int64")),
        "image": ImageFeature(),
        "objects": List(ImageFeature()),
    }
)


@pytest.fixture
def image_files(tmp_path) -> dict[str, str]:
    """Four small PNG files of different colors and sizes, and a PNG truncated after its header."""
    colors = {"red": (200, 10, 10), "green": (10, 200, 10), "blue": (10, 10, 200), "gray": (90, 90, 90)}
    paths = {}
    for name, color in colors.items():
        paths[name] = str(tmp_path / f"{name}.png")
        Image.new("RGB", (20 + 3 * len(name), 20), color).save(paths[name])
    paths["broken"] = str(tmp_path / "broken.png")
    Image.frombytes("RGB", (64, 64), bytes(range(256)) * 48).save(paths["broken"])
    (tmp_path / "broken.png").write_bytes((tmp_path / "broken.png").read_bytes()[:-400])
    return paths


def embedded(path: str | None) -> dict | None:
    """The `datasets.Image()` value of an embedded file: its bytes and only its name (its folder is not shipped)."""
    return None if path is None else {"bytes": open(path, "rb").read(), "path": path.rsplit("/", 1)[-1]}


def path_and_image_datasets(files: dict[str, str]) -> tuple[Dataset, Dataset]:
    """Three tweets (two crops; a truncated image; no image) with path columns, and the same rows with their files
    embedded in `Image()` columns, decoded on read as `load_dataset` gives them."""
    rows = {
        "tokens": [["kevin", "in", "boston"], ["apple", "store"], ["boston"]],
        "ner_tags": [[1, 0, 3], [5, 0], [3]],
        "image": [files["red"], files["broken"], None],
        "objects": [[files["green"], files["blue"]], [files["gray"]], [files["red"]]],
    }
    paths = Dataset.from_dict(rows)
    embedded_rows = {
        **rows,
        "image": [embedded(path) for path in rows["image"]],
        "objects": [[embedded(path) for path in objects] for objects in rows["objects"]],
    }
    return paths, Dataset.from_dict(embedded_rows, features=IMAGE_FEATURES)


def test_image_columns_give_the_batches_of_path_columns(image_files):
    processor = tiny_processor()
    paths, images = path_and_image_datasets(image_files)
    # Decoded by datasets, the truncated image is an uncaught error when its row is read, not a masked image.
    with pytest.raises(OSError, match="image file"):
        images[1]
    images = with_undecoded_images(images)
    assert images.features["image"] == ImageFeature(decode=False)
    assert images.features["objects"] == List(ImageFeature(decode=False))
    assert isinstance(images[0]["image"]["bytes"], bytes)
    encoded = {
        name: data.map(tokenize_and_align, batched=True, fn_kwargs={"processor": processor})
        for name, data in (("paths", paths), ("images", images))
    }
    batches, attachers = {}, {}
    for name, data in encoded.items():
        attachers[name] = ImageAttacher(processor)
        loader = DataLoader(
            data.with_transform(attachers[name]), batch_size=3, collate_fn=HVPNetDataCollator(processor)
        )
        batches[name] = next(iter(loader))
    assert batches["images"]["image_mask"].tolist() == [[True, True, True], [False, True, False], [False, True, False]]
    for name in NER_INPUTS:
        torch.testing.assert_close(batches["images"][name], batches["paths"][name], rtol=0, atol=0)
    for attacher in attachers.values():  # the truncated image, named and masked; the row without one
        assert (attacher.num_masked, attacher.num_without_image, attacher.num_dropped) == (1, 1, 0)
    # The collator decodes the rows itself alike.
    collator = HVPNetDataCollator(processor)
    from_rows = collator(list(encoded["images"]))
    for name in NER_INPUTS:
        torch.testing.assert_close(from_rows[name], batches["paths"][name], rtol=0, atol=0)
    assert (collator.attacher.num_masked, collator.attacher.num_without_image) == (1, 1)


def test_posts_with_several_images_fill_the_slots_and_count_what_is_dropped(image_files, caplog):
    processor = tiny_processor()  # 1 + 2 image slots
    pictures = [image_files[name] for name in ("red", "green", "blue", "gray")]
    rows = {
        "tokens": [["kevin"], ["boston"], ["apple"]],
        "ner_tags": [[1], [3], [5]],
        "image": [pictures[:2], pictures, []],
        "objects": [[image_files["blue"]], [], [image_files["gray"]]],
    }
    features = Features({**IMAGE_FEATURES, "image": List(ImageFeature())})
    embedded_rows = {
        **rows,
        "image": [[embedded(path) for path in post] for post in rows["image"]],
        "objects": [[embedded(path) for path in objects] for objects in rows["objects"]],
    }
    posts = with_undecoded_images(Dataset.from_dict(embedded_rows, features=features))
    assert posts.features["image"] == List(ImageFeature(decode=False))
    collator = HVPNetDataCollator(processor)
    with caplog.at_level(logging.WARNING, logger="hvpnet_hf.image_processing_hvpnet"):
        batch = collator(list(posts.map(tokenize_and_align, batched=True, fn_kwargs={"processor": processor})))
    # Two pictures and a crop; four pictures for three slots, the last dropped; no picture, a crop.
    expected = [
        (pictures[0], pictures[1], image_files["blue"]),
        (pictures[0], pictures[1], pictures[2]),
        (None, image_files["gray"], None),
    ]
    for example, slots in zip(batch["pixel_values"], expected, strict=True):
        for pixels, path in zip(example, slots, strict=True):
            one = processor.image_processor.preprocess_example(path)["pixel_values"][0]
            torch.testing.assert_close(pixels, one, rtol=0, atol=0)
    assert batch["image_mask"].tolist() == [[True, True, True], [True, True, True], [False, True, False]]
    assert (collator.attacher.num_dropped, collator.attacher.num_without_image, collator.attacher.num_masked) == (
        1,
        1,
        0,
    )
    assert "has 4 images but 3 image slots" in caplog.text
    from_paths = HVPNetDataCollator(processor)(
        list(Dataset.from_dict(rows).map(tokenize_and_align, batched=True, fn_kwargs={"processor": processor}))
    )
    torch.testing.assert_close(from_paths["pixel_values"], batch["pixel_values"], rtol=0, atol=0)


def test_an_image_column_of_urls_is_an_error_naming_the_url_under_either_policy():
    processor = tiny_processor()
    rows = Dataset.from_dict({"tokens": [["kevin"]], "ner_tags": [[1]], "objects": [[]]})
    rows = rows.add_column("image", ["http://example.com/1.jpg"])
    encoded = rows.map(tokenize_and_align, batched=True, fn_kwargs={"processor": processor})
    for policy in ("mask", "error"):
        with pytest.raises(ValueError, match=r"'image' is a URL \(http://example.com/1.jpg\).*download them first"):
            HVPNetDataCollator(processor, missing_images=policy)([encoded[0]])
