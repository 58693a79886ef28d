"""The Twitter-GMNER and FMNERG loaders on small files in the published formats, candidate regions and their recall."""

import logging

import pytest
from PIL import Image

from hvpnet_hf.grounding_data import (
    FMNERG_TYPES,
    bio_labels,
    candidate_boxes_file,
    candidate_matches,
    candidate_recall,
    grounding_counts,
    load_fmnerg_dataset,
    load_gmner_dataset,
    read_voc_boxes,
    save_candidate_boxes,
)
from hvpnet_hf.loading import MNER_LABELS

# Two tweets as NUSTM's txt files hold them: a Twitter-2015 id and a Twitter-2017 one with the `O_` prefix.
GMNER_TEXT = (
    "IMGID:1000046\nJustin\tB-PER\nBieber\tI-PER\nand\tO\nSelena\tB-PER\nat\tO\nCalvin\tB-OTHER\nand\tI-OTHER\n"
    "Hobbes\tI-OTHER\nin\tO\nToronto\tB-LOC\n⚽\tO\n\n"
    "IMGID:O_4862\n19\tO\nthings\tO\nTaylor\tB-PER\nSwift\tI-PER\ndoes\tO\n"
)
FMNERG_TEXT = (
    "IMGID:1000046\nJustin\tB-person\tB-musician\nBieber\tI-person\tI-musician\nat\tO\tO\n"
    "Toronto\tB-location\tB-city\n"
)


def voc(objects: str, width: int = 500, height: int = 706) -> str:
    """A Pascal VOC file in the layout of the release's `xml/` files."""
    return (
        "<annotation>\n\t<folder>9-split</folder>\n\t<filename>1000046.jpg</filename>\n"
        f"\t<size>\n\t\t<width>{width}</width>\n\t\t<height>{height}</height>\n\t\t<depth>3</depth>\n\t</size>\n"
        f"\t<segmented>0</segmented>\n{objects}</annotation>\n"
    )


def voc_object(name: str, box: tuple[int, int, int, int]) -> str:
    coordinates = "".join(
        f"\t\t\t<{key}>{value}</{key}>\n" for key, value in zip(("xmin", "ymin", "xmax", "ymax"), box, strict=True)
    )
    return (
        f"\t<object>\n\t\t<name>{name}</name>\n\t\t<pose>Unspecified</pose>\n\t\t<truncated>0</truncated>\n"
        f"\t\t<difficult>0</difficult>\n\t\t<bndbox>\n{coordinates}\t\t</bndbox>\n\t</object>\n"
    )


@pytest.fixture
def release(tmp_path):
    """A Twitter-GMNER release in miniature: `txt/test.txt` and `xml/1000046.xml` (the `O_` tweet has no box file)."""
    (tmp_path / "txt").mkdir()
    (tmp_path / "xml").mkdir()
    (tmp_path / "txt" / "test.txt").write_text(GMNER_TEXT, encoding="utf-8")
    objects = (
        voc_object("Justin Bieber", (132, 22, 300, 400))
        + voc_object("Justin Bieber", (310, 30, 500, 706))
        + voc_object("Toronto", (0, 0, 500, 200))
        + voc_object("Drake", (10, 10, 50, 50))
    )
    (tmp_path / "xml" / "1000046.xml").write_text(voc(objects), encoding="utf-8")
    return tmp_path


def test_gmner_entities_keep_all_their_boxes(release, caplog):
    with caplog.at_level(logging.INFO, logger="hvpnet_hf.grounding_data"):
        splits = load_gmner_dataset(release / "txt", xml_dir=release / "xml")
    test = splits["test"]
    assert test.features["ner_tags"].feature.names == MNER_LABELS
    first, second = test[0], test[1]
    assert first["image_id"] == "1000046.jpg" and second["image_id"] == "O_4862.jpg"
    assert [(entity["text"], entity["type"], entity["start"], entity["end"]) for entity in first["entities"]] == [
        ("Justin Bieber", "PER", 0, 2),
        ("Selena", "PER", 3, 4),
        ("Calvin and Hobbes", "MISC", 5, 8),  # OTHER is read as MISC
        ("Toronto", "LOC", 9, 10),
    ]
    assert first["entities"][0]["boxes"] == [[132, 22, 300, 400], [310, 30, 500, 706]]
    assert first["entities"][1]["boxes"] == [] and first["entities"][2]["boxes"] == []
    assert first["entities"][3]["boxes"] == [[0, 0, 500, 200]]
    # The O_ tweet has no box file: its entity is ungroundable.
    assert second["entities"] == [{"start": 2, "end": 4, "type": "PER", "text": "Taylor Swift", "boxes": []}]
    assert first["tokens"][-1] == "⚽" and first["candidate_boxes"] == []
    assert grounding_counts(test) == {"entities": 5, "groundable": 2, "ungroundable": 3, "boxes": 3}
    assert "5 entities, 2 groundable (3 boxes), 3 ungroundable" in caplog.text
    assert "1 box names match no entity string of their tweet" in caplog.text and "'Drake'" in caplog.text


def test_surface_strings_join_boxes_exactly(tmp_path):
    # Case and spacing count, as in NUSTM's join of an entity's words with one space.
    (tmp_path / "test.txt").write_text("IMGID:7\njustin\tB-PER\nbieber\tI-PER\n", encoding="utf-8")
    (tmp_path / "xml").mkdir()
    (tmp_path / "xml" / "7.xml").write_text(voc(voc_object("Justin Bieber", (1, 1, 9, 9))), encoding="utf-8")
    test = load_gmner_dataset(tmp_path, xml_dir=tmp_path / "xml")["test"]
    assert test[0]["entities"][0]["boxes"] == []


def test_fmnerg_reads_the_tag_column_asked_for(release):
    (release / "txt_fine").mkdir()
    (release / "txt_fine" / "test.txt").write_text(FMNERG_TEXT, encoding="utf-8")
    fine = load_fmnerg_dataset(release / "txt_fine", xml_dir=release / "xml")["test"]
    coarse = load_fmnerg_dataset(release / "txt_fine", xml_dir=release / "xml", tag_column="coarse")["test"]
    assert coarse.features["ner_tags"].feature.names == bio_labels(list(FMNERG_TYPES))
    assert len(fine.features["ner_tags"].feature.names) == 1 + 2 * 51
    assert [(entity["type"], len(entity["boxes"])) for entity in fine[0]["entities"]] == [("musician", 2), ("city", 1)]
    assert [entity["type"] for entity in coarse[0]["entities"]] == ["person", "location"]
    with pytest.raises(ValueError, match="tag_column must be one of"):
        load_fmnerg_dataset(release / "txt_fine", xml_dir=release / "xml", tag_column="third")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("IMGID:1\nParis\tB-MISC\n", r"test.txt:2: tag 'B-MISC' is not O, B-TYPE or I-TYPE over the types"),
        ("IMGID:1\nParis B-LOC\n", r"test.txt:2: expected 2 tab-separated columns"),
        ("Paris\tB-LOC\n", r"test.txt:1: word line before any IMGID line"),
        ("IMGID:1\n\nIMGID:2\nParis\tB-LOC\n", r"test.txt:1: IMGID block has no word lines"),
    ],
)
def test_malformed_text_is_named_by_file_and_line(tmp_path, text, message):
    (tmp_path / "test.txt").write_text(text, encoding="utf-8")
    (tmp_path / "xml").mkdir()
    with pytest.raises(ValueError, match=message):
        load_gmner_dataset(tmp_path, xml_dir=tmp_path / "xml")


def test_fmnerg_checks_the_fine_column_against_its_types(tmp_path):
    (tmp_path / "test.txt").write_text("IMGID:1\nParis\tB-location\tB-town\n", encoding="utf-8")
    (tmp_path / "xml").mkdir()
    with pytest.raises(ValueError, match=r"test.txt:2: tag 'B-town'"):
        load_fmnerg_dataset(tmp_path, xml_dir=tmp_path / "xml")


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        (voc(voc_object("Toronto", (0, 0, 501, 200))), r"1.xml:15: box \[0.0, 0.0, 501.0, 200.0\] of 'Toronto' is"),
        (voc(voc_object("Toronto", (50, 0, 50, 200))), r"1.xml:15: box .* is empty or outside the 500 x 706 image"),
        (voc(voc_object("Toronto", (0, 0, 10, 10))).replace("<ymax>10", "<ymax>ten"), r"1.xml:19: <ymax> is 'ten'"),
        (voc("\t<object>\n\t\t<name>Toronto</name>\n\t</object>\n"), r"1.xml:10: <object> has no <bndbox>"),
        (voc(voc_object("Toronto", (0, 0, 10, 10))).replace("</bndbox>", ""), r"1.xml:21: not well-formed XML"),
        ("<annotation>\n<object/>\n</annotation>\n", r"1.xml:1: <annotation> has no <size>"),
    ],
)
def test_malformed_boxes_are_named_by_file_and_line(tmp_path, xml, message):
    (tmp_path / "1.xml").write_text(xml, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        read_voc_boxes(tmp_path / "1.xml")


def test_a_box_folder_without_the_tweets_box_files_is_refused(release, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"none of the box files .*looked for e.g. .*1000046.xml"):
        load_gmner_dataset(release / "txt", xml_dir=tmp_path / "empty")
    with pytest.raises(NotADirectoryError, match="xml_dir .* is not a folder"):
        load_gmner_dataset(release / "txt", xml_dir=tmp_path / "absent")


def test_candidates_are_crops_with_their_boxes(release):
    crops = release / "objects" / "test" / "crops"
    crops.mkdir(parents=True)
    for index in range(3):
        Image.new("RGB", (8, 8)).save(crops / f"1000046_crop_{index}.jpg")
    crop_map = {"1000046.jpg": [f"1000046_crop_{index}.jpg" for index in range(3)], "O_4862.jpg": []}
    # The first candidate is Justin Bieber's second box; the second overlaps Toronto's box by IoU 0.5 exactly.
    boxes = {"1000046.jpg": [[300, 40, 500, 700], [0, 0, 500, 100], [0, 500, 10, 510]], "O_4862.jpg": []}
    save_candidate_boxes(boxes, candidate_boxes_file(release / "objects", "test"))
    assert candidate_boxes_file(release / "objects", "test").name == "objects_test_boxes.json"
    sources = {"object_dir": crops, "object_maps": {"test": crop_map}}
    test = load_gmner_dataset(
        release / "txt",
        xml_dir=release / "xml",
        candidate_boxes={"test": candidate_boxes_file(release / "objects", "test")},
        num_candidates=2,
        **sources,
    )["test"]
    assert test[0]["candidate_boxes"] == boxes["1000046.jpg"][:2]
    assert [path.rsplit("/", 1)[1] for path in test[0]["objects"]] == ["1000046_crop_0.jpg", "1000046_crop_1.jpg"]
    assert candidate_recall(test) == {"recall": 0.5, "groundable": 2, "covered": 1}

    boxes["1000046.jpg"].pop()
    with pytest.raises(ValueError, match=r"image 1000046.jpg has 3 crops in its crop map but 2 candidate boxes"):
        load_gmner_dataset(release / "txt", xml_dir=release / "xml", candidate_boxes={"test": boxes}, **sources)
    with pytest.raises(ValueError, match=r"image 1000046.jpg has the box \[5, 5, 1, 1\]"):
        load_gmner_dataset(
            release / "txt", xml_dir=release / "xml", candidate_boxes={"test": {"1000046.jpg": [[5, 5, 1, 1]]}}
        )
    with pytest.raises(ValueError, match="num_candidates must be at least 1"):
        load_gmner_dataset(release / "txt", xml_dir=release / "xml", num_candidates=0)


def test_candidate_matches_take_iou_strictly_above_one_half():
    gold = [[0, 0, 2, 1], [10, 10, 20, 20]]
    # IoU with the first gold box: 0.5 exactly (2 / 4), 2 / 3; with the second: 1.
    candidates = [[0, 0, 4, 1], [0, 0, 3, 1], [10, 10, 20, 20]]
    assert candidate_matches(candidates, gold).tolist() == [False, True, True]
    assert candidate_matches(candidates, []).tolist() == [False, False, False]
    assert candidate_matches([], gold).tolist() == []
