"""Object crops from a detection pipeline: queries, box selection, the command's layout and resumption, pipelines."""

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from cmner_fixtures import write_cmner
from modeling_utils import tiny_model_folder
from PIL import Image, ImageOps
from transformers import (
    CLIPTokenizer,
    OwlViTConfig,
    OwlViTForObjectDetection,
    OwlViTImageProcessor,
    OwlViTProcessor,
    YolosConfig,
    YolosForObjectDetection,
    YolosImageProcessor,
    pipeline,
)

import hvpnet_hf.extract_objects
import hvpnet_hf.pipelines  # noqa: F401  (registers the pipelines)
from hvpnet_hf import HVPNetProcessor, load_cmner_dataset, load_mner_dataset, load_mre_dataset
from hvpnet_hf.extract_objects import crop_sources, extract_objects, run, split_of
from hvpnet_hf.grounding_data import candidate_boxes_file, load_gmner_dataset
from hvpnet_hf.image_processing_hvpnet import load_image
from hvpnet_hf.loading import find_object_maps, find_release_layout, split_folders
from hvpnet_hf.object_detection import GENERIC_QUERIES, ObjectCropper, text_queries

TWEETS = (
    "IMGID:1001\nRT\tO\n@anna_b\tO\nKevin\tB-PER\nDurant\tI-PER\nat\tO\nOracle\tB-LOC\nArena\tI-LOC\n\n"
    "IMGID:1002\nThe\tO\n#Liverpool\tB-ORG\nfans\tO\n\n"
    "IMGID:1003\nmissing\tO\npicture\tO\n"
)
MNRE_LINES = [
    {"token": ["Alice", "and", "Bob", "in", "Paris"], "h": {"name": "Alice", "pos": [0, 1]},
     "t": {"name": "Bob", "pos": [2, 3]}, "img_id": "p1.jpg", "relation": "/per/per/peer"},
    {"token": ["Alice", "and", "Bob", "in", "Paris"], "h": {"name": "Bob", "pos": [2, 3]},
     "t": {"name": "Paris", "pos": [4, 5]}, "img_id": "p1.jpg", "relation": "/per/loc/place_of_residence"},
    {"token": ["Acme", "owns", "Beta"], "h": {"name": "Acme", "pos": [0, 1]},
     "t": {"name": "Beta", "pos": [2, 3]}, "img_id": "p2.jpg", "relation": "/org/org/subsidiary"},
]  # fmt: skip


@pytest.fixture(scope="module")
def owl_folder(tmp_path_factory):
    """
    A random 1-layer OWL-ViT (32 px, 8 px patches) with its processor, saved like a Hub model. Its box head is
    zeroed, so it predicts the 16 patch-grid boxes (a quarter of the image wide and high, some reaching past the
    border); its scores are arbitrary but fixed.
    """
    folder = tmp_path_factory.mktemp("owlvit")
    vocab = {"!": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}  # OWL-ViT reads token id 0 as padding
    for letter in "abcdefghijklmnopqrstuvwxyz":
        vocab[letter] = len(vocab)
        vocab[letter + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="!")
    image_processor = OwlViTImageProcessor(size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32})
    torch.manual_seed(0)
    tiny = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = OwlViTConfig(
        text_config={
            **tiny,
            "vocab_size": len(vocab),
            "max_position_embeddings": 16,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
        vision_config={**tiny, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    model = OwlViTForObjectDetection(config)
    with torch.no_grad():
        model.box_head.dense2.weight.zero_()
        model.box_head.dense2.bias.zero_()
    model.save_pretrained(folder)
    OwlViTProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def yolos_folder(tmp_path_factory):
    """A random 1-layer YOLOS (a closed-vocabulary detector) with 6 detection tokens."""
    folder = tmp_path_factory.mktemp("yolos")
    torch.manual_seed(0)
    config = YolosConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=[32, 32],
        patch_size=8,
        num_detection_tokens=6,
        id2label={0: "thing", 1: "stuff"},
        initializer_range=0.5,  # large random weights, so that the boxes differ
    )
    model = YolosForObjectDetection(config)
    with torch.no_grad():  # they start as zeros: every detection token would see and predict the same
        model.vit.embeddings.detection_tokens.normal_()
        model.vit.embeddings.position_embeddings.normal_()
    model.save_pretrained(folder)
    YolosImageProcessor(size={"shortest_edge": 32, "longest_edge": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def owl_detector(owl_folder):
    return pipeline("zero-shot-object-detection", model=str(owl_folder))


def owl_cropper(owl_detector, **settings) -> ObjectCropper:
    """With random weights every score is tiny: threshold 0 keeps all boxes, so the selection is deterministic."""
    return ObjectCropper(owl_detector, **{"threshold": 0.0, "min_size": 2, **settings})


def picture(color=(200, 40, 40), size=(60, 40)) -> Image.Image:
    image = Image.new("RGB", size, color)
    image.paste((20, 20, 220), (10, 5, 30, 25))
    return image


@pytest.fixture
def twitter_files(tmp_path):
    data_file = tmp_path / "train.txt"
    data_file.write_text(TWEETS, encoding="utf-8")
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    picture().save(image_dir / "1001.jpg")
    picture((30, 160, 30), (48, 64)).convert("L").save(image_dir / "1002.jpg")  # 1003.jpg is missing
    return data_file, image_dir


def test_text_queries_take_mentions_and_candidate_entity_words():
    words = ["RT", "@anna_b", ":", "Kevin", "Durant", "enters", "Oracle", "Arena,", "#NBAFinals", "http://t.co/x"]
    assert text_queries(words) == ["anna b", "Kevin Durant", "Oracle Arena", "NBAFinals", *GENERIC_QUERIES]
    # Mentions come first; a candidate equal to one of them (ignoring case) is not repeated.
    assert text_queries(words, ["kevin durant", "a person"]) == [
        "kevin durant",
        "a person",
        "anna b",
        "Oracle Arena",
        "NBAFinals",
        *[query for query in GENERIC_QUERIES if query != "a person"],
    ]
    assert text_queries(["The", "rain", "in", "2024"]) == list(GENERIC_QUERIES)
    assert text_queries(words, max_text_queries=2) == ["anna b", "Kevin Durant", *GENERIC_QUERIES]


def test_selection_orders_clips_filters_and_drops_duplicates(owl_detector):
    cropper = owl_cropper(owl_detector, num_objects=3, threshold=0.2, min_size=5, max_overlap=0.5)
    found = [
        {"score": 0.5, "label": "b", "box": {"xmin": 30, "ymin": 0, "xmax": 50, "ymax": 20}},
        {"score": 0.9, "label": "a", "box": {"xmin": -10, "ymin": 20, "xmax": 20, "ymax": 70}},  # clipped
        {"score": 0.5, "label": "a", "box": {"xmin": 0, "ymin": 0, "xmax": 20, "ymax": 20}},  # tie: box order
        {"score": 0.8, "label": "c", "box": {"xmin": 0, "ymin": 0, "xmax": 4, "ymax": 30}},  # 4 px wide
        {"score": 0.1, "label": "d", "box": {"xmin": 40, "ymin": 20, "xmax": 60, "ymax": 40}},  # below threshold
        {"score": 0.7, "label": "e", "box": {"xmin": -5, "ymin": 22, "xmax": 19, "ymax": 40}},  # duplicate of "a"
    ]
    cropper.detector, cropper.zero_shot = (lambda image, **kwargs: list(found)), False
    kept = cropper.detect(picture(), ["unused"])
    assert [(item.score, item.box, item.label) for item in kept] == [
        (0.9, (0, 20, 20, 40), "a"),
        (0.5, (0, 0, 20, 20), "a"),
        (0.5, (30, 0, 50, 20), "b"),
    ]
    crops = cropper.crops(picture().convert("L"), ["unused"])
    assert [crop.size for crop in crops] == [(20, 20)] * 3 and {crop.mode for crop in crops} == {"RGB"}
    # Nothing found is no error: no crops.
    cropper.detector = lambda image, **kwargs: []
    assert cropper.detect(picture()) == [] and cropper.crops(picture()) == []


def test_zero_shot_detector_boxes_are_clipped_sorted_and_repeatable(owl_detector):
    image = picture()
    queries = ["a person", "a logo"]
    everything = owl_cropper(owl_detector, num_objects=100, max_overlap=1.0)
    raw = everything.detector(image, candidate_labels=queries, threshold=0.0)
    assert any(item["box"]["xmax"] > image.width for item in raw)  # the grid reaches past the right border
    kept = everything.detect(image, queries)
    assert len(kept) == len(raw)  # threshold 0, no size or overlap limit: every box, clipped
    for x0, y0, x1, y1 in (item.box for item in kept):
        assert 0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height
    order = [(item.score, item.box) for item in kept]
    assert order == sorted(order, key=lambda score_box: (-score_box[0], score_box[1]))
    three = owl_cropper(owl_detector, num_objects=3)
    best = three.detect(image, queries)
    assert len(best) == 3 and best[0] == kept[0] and best == three.detect(image, queries)
    with pytest.raises(ValueError, match="needs at least one query"):
        three.detect(image, [])


def test_object_detection_model_gives_the_best_boxes_whatever_their_class(yolos_folder, twitter_files, tmp_path):
    cropper = ObjectCropper(str(yolos_folder), num_objects=3, threshold=0.0, min_size=1, max_overlap=1.0)
    assert not cropper.zero_shot
    image = picture()
    raw = cropper.detector(image, threshold=0.0)
    kept = cropper.detect(image, ["queries are not used"])
    assert len(raw) == 6 and len(kept) == 3 and len({item.box for item in kept}) == 3
    # The best boxes of any class that keep at least a pixel inside the image.
    inside = [
        item["score"]
        for item in raw
        if min(item["box"]["xmax"], image.width) - max(item["box"]["xmin"], 0) >= 1
        and min(item["box"]["ymax"], image.height) - max(item["box"]["ymin"], 0) >= 1
    ]
    assert [item.score for item in kept] == sorted(inside, reverse=True)[:3]
    with pytest.raises(ValueError, match="min_size must be at least 1"):
        ObjectCropper(cropper.detector, min_size=0)
    data_file, image_dir = twitter_files
    counts = extract_objects(data_file, image_dir, tmp_path / "objects", cropper)
    crop_map = torch.load(tmp_path / "objects" / "objects_train_dict.pth", weights_only=True)
    assert counts["extracted"] == 2 and counts["crops"] == sum(map(len, crop_map.values())) > 0
    for image_file, crops in crop_map.items():
        assert len(crops) == len(cropper.detect(load_image(image_dir / image_file)))


def test_command_writes_the_layout_the_loaders_and_training_scripts_read(
    owl_folder, owl_detector, twitter_files, tmp_path
):
    data_file, image_dir = twitter_files
    output_dir = tmp_path / "objects"
    arguments = ["--input", str(data_file), "--image_dir", str(image_dir), "--output_dir", str(output_dir)]
    settings = ["--detector", str(owl_folder), "--threshold", "0", "--min_size", "2"]
    counts = run(arguments + settings)
    assert counts == {"images": 3, "skipped": 0, "extracted": 2, "missing": 1, "without_objects": 0, "crops": 6}
    crop_map = torch.load(output_dir / "objects_train_dict.pth", weights_only=True)
    assert crop_map == {name: [f"{name[:-4]}_crop_{n}.jpg" for n in range(3)] for name in ("1001.jpg", "1002.jpg")}
    assert sorted(path.name for path in (output_dir / "train" / "crops").iterdir()) == sorted(
        sum(crop_map.values(), [])
    )
    # run_mner.py / run_mre.py find the map and the crop folder of the split from --object_dir / --object_map_dir.
    assert find_object_maps(str(output_dir)) == {"train": str(output_dir / "objects_train_dict.pth")}
    assert split_folders(str(output_dir)) == {"train": str(output_dir / "train" / "crops")}
    data = load_mner_dataset(
        data_files={"train": data_file},
        **find_release_layout(image_dir, output_dir, output_dir),
    )["train"]
    assert [len(objects) for objects in data["objects"]] == [3, 3, 0]  # the missing picture has no crops
    first_crop = Image.open(data["objects"][0][0])
    best = owl_cropper(owl_detector).detect(
        Image.open(image_dir / "1001.jpg"), crop_sources(data_file)["1001.jpg"].queries
    )[0]
    assert first_crop.mode == "RGB" and first_crop.size == (best.box[2] - best.box[0], best.box[3] - best.box[1])


def test_each_crop_has_its_box_for_grounding(owl_detector, twitter_files, tmp_path):
    data_file, image_dir = twitter_files
    extract_objects(data_file, image_dir, tmp_path / "objects", owl_cropper(owl_detector))
    boxes = json.loads(candidate_boxes_file(tmp_path / "objects", "train").read_text())
    crop_map = torch.load(tmp_path / "objects" / "objects_train_dict.pth", weights_only=True)
    assert list(boxes) == list(crop_map)  # the missing picture is in neither
    for name, crops in crop_map.items():
        # One box per crop, in the map's order: the crop is the image cut at its box.
        assert len(boxes[name]) == len(crops)
        image = load_image(image_dir / name)
        for crop, box in zip(crops, boxes[name], strict=True):
            assert Image.open(tmp_path / "objects" / "train" / "crops" / crop).size == (
                box[2] - box[0],
                box[3] - box[1],
            )
            assert 0 <= box[0] < box[2] <= image.width and 0 <= box[1] < box[3] <= image.height
    # The grounding loader reads the boxes as each image's candidates, aligned with its crops.
    (tmp_path / "xml").mkdir()
    (tmp_path / "xml" / "1001.xml").write_text(
        "<annotation><size><width>60</width><height>40</height></size><object><name>Kevin Durant</name>"
        "<bndbox><xmin>10</xmin><ymin>5</ymin><xmax>30</xmax><ymax>25</ymax></bndbox></object></annotation>"
    )
    data = load_gmner_dataset(
        data_files={"train": data_file},
        xml_dir=tmp_path / "xml",
        **find_release_layout(image_dir, tmp_path / "objects", tmp_path / "objects"),
        candidate_boxes={"train": candidate_boxes_file(tmp_path / "objects", "train")},
    )["train"]
    assert data["candidate_boxes"][:2] == [[list(map(float, box)) for box in boxes[name]] for name in crop_map]


def test_mnre_file_queries_head_and_tail_and_maps_by_image(owl_detector, tmp_path):
    data_file = tmp_path / "mnre_val.txt"
    data_file.write_text("".join(repr(line) + "\n" for line in MNRE_LINES), encoding="utf-8")
    sources = crop_sources(data_file)
    assert list(sources) == ["p1.jpg", "p2.jpg"]
    # The pairs sharing a picture pool their mentions: head and tail of the first pair, then the new one.
    assert sources["p1.jpg"].queries[:3] == ["Alice", "Bob", "Paris"]
    assert sources["p2.jpg"].queries[:2] == ["Acme", "Beta"]
    image_dir = tmp_path / "img_org"
    image_dir.mkdir()
    picture().save(image_dir / "p1.jpg")
    picture((10, 10, 10), (80, 80)).save(image_dir / "p2.jpg")
    output_dir = tmp_path / "objects"
    counts = extract_objects(data_file, image_dir, output_dir, owl_cropper(owl_detector, num_objects=2))
    assert counts["extracted"] == 2 and counts["crops"] == 4
    data = load_mre_dataset(
        data_files={"validation": data_file},
        **find_release_layout(image_dir, output_dir, output_dir),
    )["validation"]
    assert [[Path(crop).name for crop in objects] for objects in data["objects"]] == [
        ["p1_crop_0.jpg", "p1_crop_1.jpg"],
        ["p1_crop_0.jpg", "p1_crop_1.jpg"],
        ["p2_crop_0.jpg", "p2_crop_1.jpg"],
    ]


def test_input_errors_name_the_file(tmp_path):
    assert [split_of(Path(name)) for name in ("valid.txt", "mnre_dev.txt", "ours_train.txt", "test.txt")] == [
        "val",
        "val",
        "train",
        "test",
    ]
    with pytest.raises(ValueError, match="cannot tell the split from the file name tweets.txt; pass --split"):
        split_of(Path("tweets.txt"))
    notes = tmp_path / "notes.txt"
    notes.write_text("\nhello\n", encoding="utf-8")
    with pytest.raises(ValueError, match="notes.txt: starts neither with 'IMGID:'"):
        crop_sources(notes)


def test_a_second_run_skips_done_images_and_an_interrupted_run_leaves_a_usable_map(
    owl_detector, twitter_files, tmp_path, monkeypatch
):
    data_file, image_dir = twitter_files
    complete = tmp_path / "complete"
    extract_objects(data_file, image_dir, complete, owl_cropper(owl_detector))

    interrupted = tmp_path / "interrupted"
    cropper = owl_cropper(owl_detector)
    real_detect, calls = cropper.detect, []

    def detect_then_stop(image, queries):
        calls.append(queries)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_detect(image, queries)

    monkeypatch.setattr(cropper, "detect", detect_then_stop)
    with pytest.raises(KeyboardInterrupt):
        extract_objects(data_file, image_dir, interrupted, cropper, save_every=100)
    partial = torch.load(interrupted / "objects_train_dict.pth", weights_only=True)
    assert list(partial) == ["1001.jpg"] and not list(interrupted.glob("*.partial"))

    assert list(json.loads((interrupted / "objects_train_boxes.json").read_text())) == ["1001.jpg"]

    monkeypatch.setattr(cropper, "detect", real_detect)
    counts = extract_objects(data_file, image_dir, interrupted, cropper)
    assert counts["skipped"] == 1 and counts["extracted"] == 1
    finished = torch.load(interrupted / "objects_train_dict.pth", weights_only=True)
    assert finished == torch.load(complete / "objects_train_dict.pth", weights_only=True)
    for name in sum(finished.values(), []):
        assert (interrupted / "train" / "crops" / name).read_bytes() == (
            complete / "train" / "crops" / name
        ).read_bytes()

    boxes = json.loads((interrupted / "objects_train_boxes.json").read_text())
    assert boxes == json.loads((complete / "objects_train_boxes.json").read_text())

    monkeypatch.setattr(cropper, "detect", detect_then_stop)
    calls.clear()
    again = extract_objects(data_file, image_dir, interrupted, cropper)
    assert calls == [] and again["skipped"] == 2 and again["missing"] == 1  # only the missing picture is tried
    with pytest.raises(ValueError, match="objects_train_settings.json records crops made with"):
        extract_objects(data_file, image_dir, interrupted, owl_cropper(owl_detector, num_objects=2))


class FixedBoxes:
    """A stand-in detector that finds `boxes` (xmin, ymin, xmax, ymax) in any image and records the sizes it saw."""

    model = SimpleNamespace(name_or_path="fixed-boxes")

    def __init__(self, *boxes: tuple[int, int, int, int]):
        self.boxes = boxes
        self.seen_sizes: list[tuple[int, int]] = []

    def __call__(self, image: Image.Image, **kwargs) -> list[dict]:
        self.seen_sizes.append(image.size)
        names = ("xmin", "ymin", "xmax", "ymax")
        return [
            {"score": 0.9 - index / 10, "label": "a", "box": dict(zip(names, box, strict=True))}
            for index, box in enumerate(self.boxes)
        ]


def fixed_box_cropper(owl_detector, *boxes: tuple[int, int, int, int], **settings) -> ObjectCropper:
    cropper = owl_cropper(owl_detector, **settings)
    cropper.detector, cropper.zero_shot = FixedBoxes(*boxes), False
    return cropper


def test_cmner_posts_get_crops_of_their_first_picture_keyed_by_wid(owl_detector, tmp_path):
    text_dir, image_dir = write_cmner(tmp_path)
    output_dir = tmp_path / "objects"
    cropper = fixed_box_cropper(owl_detector, (2, 2, 18, 14))
    counts = extract_objects(text_dir / "train.txt", image_dir, output_dir, cropper)
    assert counts == {"images": 3, "skipped": 0, "extracted": 2, "missing": 1, "without_objects": 0, "crops": 2}
    # Ab12Cd's pictures are Ab12Cd_a01.jpg (the first by name) and Ab12Cd_zz9.jpg; Ij56Kl has none.
    crop_map = torch.load(output_dir / "objects_train_dict.pth", weights_only=True)
    assert crop_map == {"Ab12Cd": ["Ab12Cd_a01_crop_0.jpg"], "Ef34Gh": ["Ef34Gh_k7_crop_0.jpg"]}
    crop = np.asarray(Image.open(output_dir / "train" / "crops" / "Ab12Cd_a01_crop_0.jpg"), dtype=float)
    # The two pictures differ by 40 in red (0 and 40); JPEG moves a flat color by a few levels.
    assert crop.shape == (12, 16, 3) and abs(crop[..., 0].mean() - 40) < 8
    data = load_cmner_dataset(
        data_files={"train": text_dir / "train.txt"}, **find_release_layout(image_dir, output_dir, output_dir)
    )["train"]
    crops = output_dir / "train" / "crops"
    assert data["objects"] == [[str(crops / "Ab12Cd_a01_crop_0.jpg")], [str(crops / "Ef34Gh_k7_crop_0.jpg")], []]


def test_an_image_file_that_cannot_be_read_gives_no_crops(owl_detector, tmp_path, caplog):
    cropper = fixed_box_cropper(owl_detector, (2, 2, 18, 14))
    with caplog.at_level(logging.WARNING, logger="hvpnet_hf.object_detection"):
        assert cropper.crops_for_text(tmp_path / "gone.jpg", ["Kevin"]) == []
    assert "gone.jpg" in caplog.text


def test_crops_of_an_exif_rotated_photo_are_cut_from_the_upright_image(owl_detector, tmp_path):
    # Stored 40 wide and 20 high, every pixel a different color; EXIF orientation 6 says: rotate 90 degrees
    # clockwise to view, so the picture (and the model's global image) is 20 wide and 40 high.
    rows, columns = np.mgrid[0:20, 0:40]
    stored = np.stack([rows * 12, columns * 6, 255 - columns * 6], axis=-1).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    Image.fromarray(stored).save(image_dir / "1001.jpg", exif=exif, quality=100)
    upright = ImageOps.exif_transpose(Image.open(image_dir / "1001.jpg")).convert("RGB")
    assert upright.size == (20, 40)
    # The second box lies below row 20: inside the upright picture only.
    boxes = [(2, 2, 18, 14), (4, 22, 16, 38)]
    cropper = fixed_box_cropper(owl_detector, *boxes, num_objects=2, min_size=4)
    # A path, the opened file (still sideways, with its EXIF), an array of the upright picture and the file's bytes as
    # a `datasets.Image()` value give the same crops.
    embedded = {"bytes": (image_dir / "1001.jpg").read_bytes(), "path": "1001.jpg"}
    sources = (image_dir / "1001.jpg", Image.open(image_dir / "1001.jpg"), np.asarray(upright), embedded)
    for source in sources:
        crops = cropper.crops_for_text(source, ["Kevin"])
        assert [crop.size for crop in crops] == [(16, 12), (12, 16)]
        for crop, box in zip(crops, boxes, strict=True):
            assert np.array_equal(np.asarray(crop), np.asarray(upright.crop(box)))
    assert cropper.detector.seen_sizes == [(20, 40)] * 4  # the detector too is shown the upright picture
    data_file = tmp_path / "train.txt"
    data_file.write_text("IMGID:1001\nKevin\tB-PER\n", encoding="utf-8")
    counts = extract_objects(data_file, image_dir, tmp_path / "objects", cropper)
    assert counts["crops"] == 2
    written = [Image.open(tmp_path / "objects" / "train" / "crops" / f"1001_crop_{index}.jpg") for index in (0, 1)]
    assert [crop.size for crop in written] == [(16, 12), (12, 16)]


def test_a_decompression_bomb_is_counted_as_missing_and_extraction_goes_on(
    owl_detector, twitter_files, tmp_path, monkeypatch, caplog
):
    data_file, image_dir = twitter_files
    picture(size=(200, 100)).save(image_dir / "1001.jpg")  # the first image of the file
    # PIL refuses images of more than twice MAX_IMAGE_PIXELS with DecompressionBombError (not an OSError); the limit
    # is lowered instead of writing a huge file: 200 x 100 is over 2 x 5000, 1002.jpg's 48 x 64 is under 5000.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)
    with caplog.at_level(logging.WARNING, logger="hvpnet_hf.extract_objects"):
        counts = extract_objects(data_file, image_dir, tmp_path / "objects", owl_cropper(owl_detector))
    assert counts == {"images": 3, "skipped": 0, "extracted": 1, "missing": 2, "without_objects": 0, "crops": 3}
    assert "1001.jpg" in caplog.text and "decompression bomb" in caplog.text
    crop_map = torch.load(tmp_path / "objects" / "objects_train_dict.pth", weights_only=True)
    assert list(crop_map) == ["1002.jpg"]  # the bomb and the missing picture are tried again by a later run


def test_pipeline_masks_a_decompression_bomb_instead_of_detecting_in_it(owl_detector, tiny_ner_dir, tmp_path):
    path = tmp_path / "bomb.jpg"
    picture(size=(200, 100)).save(path)
    cropper = fixed_box_cropper(owl_detector, (0, 0, 20, 20), num_objects=2)
    ner = pipeline("multimodal-ner", model=tiny_ner_dir, objects=cropper, missing_images="mask")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)
        encoded = ner.preprocess({"words": ["Kevin"], "image": str(path)}, **ner._preprocess_params)["features"][0]
        assert isinstance(ner({"words": ["Kevin"], "image": str(path)}), list)
    assert encoded["image_mask"].tolist() == [False, False, False] and cropper.detector.seen_sizes == []


def test_pipeline_detects_crops_for_inputs_without_them(owl_detector, tiny_ner_dir):
    image = picture()
    words = ["Kevin", "Durant", "at", "Oracle", "Arena"]
    cropper = owl_cropper(owl_detector, num_objects=2)
    ner = pipeline("multimodal-ner", model=tiny_ner_dir, objects=cropper)
    encoded = ner.preprocess({"words": words, "image": image}, **ner._preprocess_params)["features"][0]
    crops = cropper.crops_for_text(image, words)
    expected = HVPNetProcessor.from_pretrained(tiny_ner_dir)(image, words, objects=crops)
    assert encoded["image_mask"][1:].tolist() == [True, True]  # slot 0 is the global image, then the crops
    assert torch.equal(encoded["pixel_values"][1:], expected["pixel_values"][0, 1:])
    # Crops the input brings are used as they are; no image, no detection.
    given = ner.preprocess({"words": words, "image": image, "objects": [image]}, **ner._preprocess_params)
    assert given["features"][0]["image_mask"][1:].tolist() == [True, False]
    without_image = ner.preprocess({"words": words}, **ner._preprocess_params)["features"][0]
    assert without_image["image_mask"][1:].tolist() == [False, False]


def test_pipeline_detect_setting_builds_one_detector(owl_folder, tiny_ner_dir, tmp_path):
    ner = pipeline("multimodal-ner", model=tiny_ner_dir, objects="detect", detector=str(owl_folder))
    cropper = ner._preprocess_params["object_cropper"]
    assert cropper.num_objects == 2 and cropper.threshold == 0.1  # the model's crop count, the default threshold
    ner({"text": "Kevin Durant", "image": picture()}, objects="detect", detector=str(owl_folder))
    assert ner._object_cropper is cropper  # the same detector is not loaded again
    # The random detector scores nothing above 0.1: no crops, masked, and still a prediction.
    encoded = ner.preprocess({"text": "Kevin Durant", "image": picture()}, **ner._preprocess_params)
    assert encoded["features"][0]["image_mask"][1:].tolist() == [False, False]
    with pytest.raises(ValueError, match="objects must be 'detect'"):
        ner("Kevin", objects="yes")


def test_re_pipeline_queries_the_head_and_tail(owl_detector, tmp_path, monkeypatch):
    tiny_model_folder(tmp_path, "re")
    cropper = owl_cropper(owl_detector, num_objects=2)
    asked = []
    real_crops = cropper.crops
    monkeypatch.setattr(cropper, "crops", lambda image, queries: asked.append(queries) or real_crops(image, queries))
    relation = pipeline("multimodal-re", model=str(tmp_path), objects=cropper)
    example = {"words": ["Alice", "visits", "Acme", "Corp"], "head": (0, 1), "tail": (2, 4), "image": picture()}
    assert relation(example)["relation"]
    assert asked == [["Alice", "Acme Corp", *GENERIC_QUERIES]]


def test_paths_are_checked_before_the_detector_is_loaded(tmp_path, monkeypatch):
    monkeypatch.setattr(hvpnet_hf.extract_objects, "ObjectCropper", lambda *args, **kwargs: pytest.fail("loaded"))
    data = tmp_path / "test.txt"
    data.write_text("IMGID:1\nhello\tO\n\n", encoding="utf-8")
    (tmp_path / "taken").write_text("a file", encoding="utf-8")
    arguments = ["--input", str(data), "--image_dir", str(tmp_path), "--output_dir", str(tmp_path / "objects")]
    cases = [
        (["--input", str(tmp_path / "absent.txt")], FileNotFoundError, "--input .*absent.txt is not a file"),
        (["--image_dir", str(data)], NotADirectoryError, "--image_dir .*test.txt is not a folder"),
        (["--output_dir", str(tmp_path / "taken")], NotADirectoryError, "--output_dir .*taken: .*taken is a file"),
    ]
    for override, error, message in cases:
        with pytest.raises(error, match=message):
            run([*arguments, *override])
    data.rename(tmp_path / "tweets.txt")
    with pytest.raises(ValueError, match="cannot tell the split from the file name tweets.txt"):
        run([*arguments, "--input", str(tmp_path / "tweets.txt")])
    assert not (tmp_path / "objects").exists()
    with pytest.raises(SystemExit):
        run([*arguments, "--save_every", "0"])


def test_help_gives_the_whole_description(capsys):
    with pytest.raises(SystemExit):
        run(["--help"])
    assert " ".join(hvpnet_hf.extract_objects.__doc__.split()) in " ".join(capsys.readouterr().out.split())
