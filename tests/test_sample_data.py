"""The bundled sample sets: reproducible from their generator, in the published formats, and needing their images;
the generator's harder variant, whose pictures decide by texture alone."""

import ast
import hashlib
import json
import random
import re
import runpy
from collections import Counter, defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from hvpnet_hf import load_mner_dataset, load_mre_dataset
from hvpnet_hf.grounding_data import candidate_matches, candidate_recall, grounding_counts, load_gmner_dataset
from hvpnet_hf.loading import find_release_layout
from hvpnet_hf.sample_data import SAMPLE_DIR, sample_sources

# The generator is a development tool of the repository, not a module of the package.
build = SimpleNamespace(**runpy.run_path(str(Path(__file__).resolve().parents[1] / "tools" / "build_sample_data.py")))
TWITTER, MNRE = SAMPLE_DIR / "twitter", SAMPLE_DIR / "mnre"
SPLIT_FOLDERS = {"train": "train", "validation": "val", "test": "test"}
MRE_DICT_NAMES = {"train": "train", "validation": "dev", "test": "test"}
GENERATED = ("twitter", "mnre", "gmner")


def data_files(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every generated file under `root`."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for folder in GENERATED
        for path in sorted((root / folder).rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def ner():
    return load_mner_dataset(
        data_dir=TWITTER,
        image_dir=TWITTER / "images",
        object_dir={split: TWITTER / "aux_images" / name / "crops" for split, name in SPLIT_FOLDERS.items()},
        object_maps={split: TWITTER / f"twitter_{name}_dict.pth" for split, name in SPLIT_FOLDERS.items()},
    )


@pytest.fixture(scope="module")
def mre():
    return load_mre_dataset(
        data_dir=MNRE / "txt",
        image_dir={split: MNRE / "img_org" / name for split, name in SPLIT_FOLDERS.items()},
        object_dir={split: MNRE / "img_vg" / name / "crops" for split, name in SPLIT_FOLDERS.items()},
        object_maps={split: MNRE / "txt" / f"mre_{MRE_DICT_NAMES[split]}_dict.pth" for split in SPLIT_FOLDERS},
        rel2id=MNRE / "mnre_rel2id.json",
    )


def test_release_layout_is_found_as_spelled_out_here():
    # The fixtures above name every folder and crop map by hand; the layout discovery must find the same ones.
    twitter = find_release_layout(TWITTER / "images", TWITTER / "aux_images", TWITTER)
    assert twitter == {
        "image_dir": TWITTER / "images",  # flat: one folder for every split
        "object_dir": {split: str(TWITTER / "aux_images" / name / "crops") for split, name in SPLIT_FOLDERS.items()},
        "object_maps": {split: str(TWITTER / f"twitter_{name}_dict.pth") for split, name in SPLIT_FOLDERS.items()},
    }
    mnre = find_release_layout(MNRE / "img_org", MNRE / "img_vg", MNRE / "txt")
    assert mnre == {
        "image_dir": {split: str(MNRE / "img_org" / name) for split, name in SPLIT_FOLDERS.items()},
        "object_dir": {split: str(MNRE / "img_vg" / name / "crops") for split, name in SPLIT_FOLDERS.items()},
        "object_maps": {split: str(MNRE / "txt" / f"mre_{MRE_DICT_NAMES[split]}_dict.pth") for split in SPLIT_FOLDERS},
    }


def test_generator_reproduces_the_committed_files(tmp_path):
    build.build(tmp_path)
    committed, rebuilt = data_files(SAMPLE_DIR), data_files(tmp_path)
    assert sorted(rebuilt) == sorted(committed)
    changed = [name for name in committed if committed[name] != rebuilt[name]]
    # Text and crop maps must match byte for byte. JPEG bytes can differ only with another libjpeg build inside
    # another Pillow release: then the decoded pixels must still agree to within one gray level on average.
    assert not [name for name in changed if not name.endswith(".jpg")]
    for name in changed:
        old, new = (np.asarray(Image.open(root / name), dtype=np.float64) for root in (SAMPLE_DIR, tmp_path))
        assert old.shape == new.shape and np.abs(old - new).mean() <= 1.0, f"{name} changed when rebuilt"


def test_another_seed_gives_other_data(tmp_path):
    build.build(tmp_path, seed=build.DEFAULT_SEED + 1)
    assert (tmp_path / "twitter" / "train.txt").read_bytes() != (TWITTER / "train.txt").read_bytes()


def test_whole_sample_is_small():
    total = sum((SAMPLE_DIR / name).stat().st_size for name in data_files(SAMPLE_DIR))
    assert total < 5_000_000, f"sample data is {total} bytes"


def test_twitter_files_are_in_the_published_format(ner):
    expected_sizes = {"train": 300, "validation": 100, "test": 100}
    for split, file_name in (("train", "train.txt"), ("validation", "valid.txt"), ("test", "test.txt")):
        text = (TWITTER / file_name).read_text(encoding="utf-8")
        blocks = [block for block in text.split("\n\n") if block.strip()]
        for block in blocks:
            first, *token_lines = block.strip("\n").split("\n")
            assert re.fullmatch(r"IMGID:\d+", first), first
            assert token_lines and all(
                re.fullmatch(r"[^\t\s]+\t(O|[BI]-(PER|LOC|ORG|MISC))", line) for line in token_lines
            )
        # Every block becomes one example, in order.
        assert ner[split].num_rows == len(blocks) == expected_sizes[split]
        assert ner[split]["image_id"] == [block.split("\n")[0][len("IMGID:") :] + ".jpg" for block in blocks]


def test_twitter_images_and_crops(ner):
    for split, folder in SPLIT_FOLDERS.items():
        crop_map = torch.load(TWITTER / f"twitter_{folder}_dict.pth", weights_only=True)
        assert all(re.fullmatch(r"\d+\.jpg", key) for key in crop_map), "keyed by image file name"
        images, objects = ner[split]["image"], ner[split]["objects"]
        # A few pictures are missing on purpose (masked by the loader); each missing one has no crops either.
        num_missing = sum(image is None for image in images)
        assert 0 < num_missing < 0.12 * len(images)
        assert all(not crops for image, crops in zip(images, objects, strict=True) if image is None)
        assert all(crop is not None and Path(crop).is_file() for crops in objects for crop in crops)
        assert {len(crops) for crops in objects} == {0, 1, 2, 3}
        sizes = {Image.open(image).size for image in images if image is not None}
        assert sizes == {(build.IMAGE_SIZE, build.IMAGE_SIZE)}


def test_mnre_files_are_in_the_published_format(mre):
    rel2id = json.loads((MNRE / "mnre_rel2id.json").read_text())
    assert len(rel2id) == 23 and rel2id["None"] == 0
    for split, folder in SPLIT_FOLDERS.items():
        lines = (MNRE / "txt" / f"mnre_{folder}.txt").read_text(encoding="utf-8").splitlines()
        for line in lines:
            record = ast.literal_eval(line)
            assert set(record) == {"token", "h", "t", "img_id", "relation"}
            for entity in (record["h"], record["t"]):
                start, end = entity["pos"]
                assert 0 <= start < end <= len(record["token"])
                assert " ".join(record["token"][start:end]) == entity["name"]
            assert record["relation"] in rel2id
        assert mre[split].num_rows == len(lines) >= 100
        crop_map = torch.load(MNRE / "txt" / f"mre_{MRE_DICT_NAMES[split]}_dict.pth", weights_only=True)
        assert all(isinstance(key, int) and 0 <= key < len(lines) for key in crop_map), "keyed by sample index"
        for index, crops in crop_map.items():
            assert [Path(path).name for path in mre[split][index]["objects"]] == crops
    # Several relation pairs share one sentence and its picture, as in MNRE.
    assert len(set(mre["train"]["image_id"])) < mre["train"].num_rows


def test_tweets_look_like_tweets(ner):
    words = [word for tokens in ner["train"]["tokens"] for word in tokens]
    assert any(word.startswith("@") for word in words)
    assert any(word.startswith("#") for word in words)
    assert any(word.startswith("http://t.co/") for word in words)
    assert any(ord(character) > 0x2600 for word in words for character in word), "some emoji"
    assert max(len(tokens) for tokens in ner["train"]["tokens"]) > 40, "a few long tweets"


def groups_of_identical_text(texts, labels) -> list[list[tuple]]:
    """Groups of examples with identical text (2+ members), each member as (label, example index)."""
    by_text = defaultdict(list)
    for index, (text, label) in enumerate(zip(texts, labels, strict=True)):
        by_text[text].append((label, index))
    return [group for group in by_text.values() if len(group) > 1]


def test_ner_ambiguity_is_exact_and_only_the_image_decides(ner):
    for split in SPLIT_FOLDERS:
        texts = [tuple(tokens) for tokens in ner[split]["tokens"]]
        groups = groups_of_identical_text(texts, [tuple(tags) for tags in ner[split]["ner_tags"]])
        # Each copy of an ambiguous text carries a different reading, so any text-only answer gets one right.
        assert all(len({labels for labels, _ in group}) == len(group) for group in groups)
        images = ner[split]["image"]
        assert all(all(images[index] is not None for _, index in group) for group in groups)
        num_ambiguous = sum(len(group) for group in groups)
        assert num_ambiguous >= 0.4 * len(texts), f"{split}: only {num_ambiguous} ambiguous tweets"


def test_mre_ambiguity_is_exact(mre):
    for split in SPLIT_FOLDERS:
        data = mre[split]
        texts = [
            (tuple(tokens), head["start"], head["end"], tail["start"], tail["end"])
            for tokens, head, tail in zip(data["tokens"], data["head"], data["tail"], strict=True)
        ]
        groups = groups_of_identical_text(texts, data["relation"])
        assert all(len({relation for relation, _ in group}) == len(group) for group in groups)
        assert sum(len(group) for group in groups) >= 0.4 * len(texts)


def mean_color(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64).mean(axis=(0, 1))


def nearest_centroid_accuracy(train: list[tuple[str, str]], test: list[tuple[str, str]]) -> float:
    """Accuracy of labeling each test picture with the label whose mean train color is nearest."""
    colors = defaultdict(list)
    for path, label in train:
        colors[label].append(mean_color(path))
    centroids = {label: np.mean(values, axis=0) for label, values in colors.items()}
    hits = [
        min(centroids, key=lambda label: np.linalg.norm(centroids[label] - mean_color(path))) == gold
        for path, gold in test
    ]
    return sum(hits) / len(hits)


def image_decided_ner(split) -> list[tuple[str, str]]:
    """(picture, entity type of the ambiguous word) for the tweets whose text occurs with other tags."""
    names = split.features["ner_tags"].feature.names
    tags = [tuple(names[tag] for tag in sequence) for sequence in split["ner_tags"]]
    pairs = []
    for group in groups_of_identical_text([tuple(tokens) for tokens in split["tokens"]], tags):
        position = next(i for i in range(len(group[0][0])) if len({labels[i] for labels, _ in group}) > 1)
        pairs += [(split[index]["image"], labels[position][2:]) for labels, index in group]
    return pairs


def test_pictures_carry_a_learnable_cue(ner):
    # Even the crudest image feature, the mean color, decides the ambiguous type far above the best text-only
    # answer (50%: two readings per text). 0.9 leaves room for the jitter of the generator's palettes.
    train, test = image_decided_ner(ner["train"]), image_decided_ner(ner["test"])
    assert nearest_centroid_accuracy(train, test) >= 0.9


@pytest.fixture(scope="module")
def texture_ner(tmp_path_factory):
    """The NER set of the harder variant, in which textures alone decide the image-decided types."""
    root = tmp_path_factory.mktemp("textures")
    build.main(["--output_dir", str(root), "--cues", "texture"])
    twitter = root / "twitter"
    return load_mner_dataset(
        data_dir=twitter, **find_release_layout(twitter / "images", twitter / "aux_images", twitter)
    )


def test_texture_variant_keeps_the_ambiguity_and_hides_the_type_from_the_mean_color(ner, texture_ner):
    # The same construction as the bundled set (sizes, groups of identical text with one type per picture), but the
    # mean color, which decides the bundled set's ambiguous types (test above), is no better than chance here.
    assert texture_ner.num_rows == ner.num_rows
    train, test = image_decided_ner(texture_ner["train"]), image_decided_ner(texture_ner["test"])
    assert len(test) >= 0.4 * len(image_decided_ner(ner["test"]))
    majority = max(Counter(label for _, label in test).values()) / len(test)
    assert nearest_centroid_accuracy(train, test) <= majority


def test_texture_styles_differ_only_in_their_texture():
    # The same draws paint the same colors, shape and clutter whatever the texture: per picture the mean color
    # moves by a few gray levels between textures while the pixels differ widely.
    for seed in range(5):
        images = [
            np.asarray(build.paint_scene(random.Random(seed), build.TextureStyle(texture))[0], dtype=np.float64)
            for texture in build.TEXTURES
        ]
        means = np.array([image.mean(axis=(0, 1)) for image in images])
        assert np.abs(means - means[0]).max() < 8
        assert min(np.abs(image - images[0]).mean() for image in images[1:]) > 15


def test_unknown_cues_are_refused(tmp_path):
    with pytest.raises(ValueError, match="cues must be one of \\['color', 'texture'\\], got 'shape'"):
        build.build(tmp_path, cues="shape")


@pytest.fixture(scope="module")
def gmner():
    return load_gmner_dataset(**sample_sources("gmner"))


def test_gmner_set_is_in_the_published_format(gmner):
    gmner_dir = SAMPLE_DIR / "gmner"
    for split, file_name in (("train", "train"), ("validation", "dev"), ("test", "test")):
        blocks = (gmner_dir / "txt" / f"{file_name}.txt").read_text(encoding="utf-8").strip("\n").split("\n\n")
        assert gmner[split].num_rows == len(blocks) == {"train": 180, "validation": 60, "test": 60}[split]
        for block in blocks:
            first, *token_lines = block.split("\n")
            assert re.fullmatch(r"IMGID:(O_)?\d+", first), first
            assert all(re.fullmatch(r"[^\t\s]+\t(O|[BI]-(PER|LOC|ORG|OTHER))", line) for line in token_lines)
        # As in the release, the `O_` tweets have no box file; every other tweet has one.
        ids = [block.split("\n")[0].removeprefix("IMGID:") for block in blocks]
        assert [(gmner_dir / "xml" / f"{image_id}.xml").is_file() for image_id in ids] == [
            not image_id.startswith("O_") for image_id in ids
        ]
        assert any(image_id.startswith("O_") for image_id in ids)
        # One box per crop, in the crop map's order (what hvpnet-extract-objects writes).
        pairs = zip(gmner[split]["candidate_boxes"], gmner[split]["objects"], strict=True)
        assert all(len(boxes) == len(crops) for boxes, crops in pairs)


def test_gmner_set_has_ungroundable_entities_distractors_and_missed_regions(gmner):
    for split in SPLIT_FOLDERS:
        counts = grounding_counts(gmner[split])
        # Roughly GROUNDABLE_SHARE of the entities are painted (fewer: a second entity of a painted type never is).
        assert 0.5 < counts["groundable"] / counts["entities"] < 0.8, counts
        assert counts["boxes"] == counts["groundable"], "one painted shape per groundable entity"
        # A few painted shapes are not among the candidates: candidate recall is high but below 1.
        assert 0.8 < candidate_recall(gmner[split])["recall"] < 1.0
        # Some candidates are no entity's region (distractors).
        num_candidates = sum(len(boxes) for boxes in gmner[split]["candidate_boxes"])
        assert num_candidates > candidate_recall(gmner[split])["covered"]


def test_gmner_gold_boxes_are_where_the_cue_shapes_are_painted():
    # The same draws without shapes paint the same picture less its shapes, so the pixels that differ are the
    # shapes: each covers a good part of its gold box (a triangle about half of it) and none lies outside the boxes.
    for seed in range(20):
        painted = {"Lionel Messi": "PER", "Rome": "LOC", "NASA": "ORG"}
        image, boxes = build.paint_grounded_scene(random.Random(seed), painted, ["MISC"])
        plain, _ = build.paint_grounded_scene(random.Random(seed), {}, [])
        changed = (np.asarray(image, dtype=np.int16) != np.asarray(plain, dtype=np.int16)).any(axis=2)
        in_boxes = np.zeros_like(changed)
        for key, (left, top, right, bottom) in boxes.items():
            assert changed[top:bottom, left:right].mean() > 0.3, (seed, key)
            in_boxes[top:bottom, left:right] = True
        assert not changed[~in_boxes].any(), seed
        # Each shape has a grid cell of its own: the boxes of one picture never overlap.
        assert in_boxes.sum() == sum((right - left) * (bottom - top) for left, top, right, bottom in boxes.values())


def test_gmner_candidates_are_the_painted_regions_padded():
    # A detected shape is one candidate, its box padded by at most 2 pixels: the entity's region by the metric's rule.
    num_detected = 0
    for seed in range(40):
        picture = build.grounded_picture(random.Random(seed), [("Rome", "LOC"), ("NASA", "ORG")], anonymous=False)
        for (box,) in picture.gold_boxes.values():
            near = [c for c in picture.candidates if max(abs(a - b) for a, b in zip(c, box, strict=True)) <= 2]
            assert len(near) <= 1
            assert candidate_matches(near, [box]).all()
            num_detected += len(near)
        assert build.grounded_picture(random.Random(seed), [("Rome", "LOC")], anonymous=True).gold_boxes == {}
    assert num_detected > 0
