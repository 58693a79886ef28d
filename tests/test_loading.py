"""Loaders for the published Twitter-2015/2017 (UMT) and MNRE formats, on fixtures written here in those formats."""

import json
import logging

import pytest
import torch
from datasets import ClassLabel, Features, IterableDataset, List
from PIL import Image

from hvpnet_hf.loading import (
    MNER_LABELS,
    find_file_layout,
    find_release_layout,
    labels_on_model_ids,
    load_mner_dataset,
    load_mre_dataset,
    split_of_alias,
    split_of_file,
)

# Three tweets as the UMT release writes them; Twitter-2015 calls the MISC type OTHER.
MNER_TRAIN = (
    "IMGID:101\nKevin\tB-PER\nDurant\tI-PER\nin\tO\nBoston\tB-LOC\n\n"
    "IMGID:102\nRT\tO\n@nba\tO\nfinals\tB-OTHER\n\n"
    "IMGID:103\nApple\tB-ORG\nstore\tO\n"
)


def write_image(path, mode="RGB", size=(24, 16), color=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if color is not None else 128).save(path)
    return path


def write_mner_dir(tmp_path, train=MNER_TRAIN, images=("101", "102", "103")):
    data_dir = tmp_path / "twitter2015"
    data_dir.mkdir()
    (data_dir / "train.txt").write_text(train, encoding="utf-8")
    (data_dir / "valid.txt").write_text("IMGID:201\nParis\tB-LOC\n\n", encoding="utf-8")
    (data_dir / "test.txt").write_text("IMGID:301\nhello\tO\n\nIMGID:302\nGoogle\tB-ORG\n\n", encoding="utf-8")
    image_dir = tmp_path / "twitter2015_images"
    for image_id in images:
        write_image(image_dir / f"{image_id}.jpg")
    return data_dir, image_dir


def mre_line(tokens, head, tail, relation, img_id="a.jpg"):
    record = {
        "token": tokens,
        "h": {"name": " ".join(tokens[head[0] : head[1]]), "pos": list(head)},
        "t": {"name": " ".join(tokens[tail[0] : tail[1]]), "pos": list(tail)},
        "img_id": img_id,
        "relation": relation,
    }
    return repr(record)  # single-quoted Python literal, as in the MNRE release


MRE_TRAIN = [
    mre_line(["JFK", "and", "Obama", "at", "Harvard"], (0, 1), (2, 3), "/per/per/peer", "img_1.jpg"),
    mre_line(["Messi", "joins", "Inter", "Miami"], (0, 1), (2, 4), "/per/org/member_of", "img_2.jpg"),
    mre_line(["Sunset", "over", "Paris"], (0, 1), (2, 3), "None", "img_1.jpg"),
]


def write_mre_dir(tmp_path, names=("mnre_train.txt", "mnre_val .txt", "mnre_test.txt")):
    data_dir = tmp_path / "mnre"
    data_dir.mkdir()
    train, val, test = names
    (data_dir / train).write_text("\n".join(MRE_TRAIN) + "\n", encoding="utf-8")
    (data_dir / val).write_text(mre_line(["Ann", "visits", "Rome"], (0, 1), (2, 3), "/per/loc/place_of_residence"))
    (data_dir / test).write_text(mre_line(["Bob", "meets", "Carl"], (2, 3), (0, 1), "/per/per/peer") + "\n\n")
    return data_dir


# ---------------------------------------------------------------- MNER


def test_mner_reads_published_format_with_images(tmp_path):
    data_dir, image_dir = write_mner_dir(tmp_path)
    dataset = load_mner_dataset(data_dir, image_dir=image_dir)

    assert sorted(dataset) == ["test", "train", "validation"]
    assert [len(dataset[split]) for split in ("train", "validation", "test")] == [3, 1, 2]  # every block read
    train = dataset["train"]
    assert train.features["ner_tags"].feature.names == MNER_LABELS
    assert train["tokens"][0] == ["Kevin", "Durant", "in", "Boston"]
    names = train.features["ner_tags"].feature.names
    assert [names[tag] for tag in train["ner_tags"][1]] == ["O", "O", "B-MISC"]  # OTHER read as MISC
    assert train["id"] == ["0", "1", "2"]
    assert train["image_id"] == ["101.jpg", "102.jpg", "103.jpg"]
    assert train["image"][2] == str(image_dir / "103.jpg")
    assert train["objects"] == [[], [], []]
    # Images of other splits are absent from the folder: masked, not dropped.
    assert dataset["test"]["image"] == [None, None]


def test_mner_text_only(tmp_path):
    data_dir, _ = write_mner_dir(tmp_path)
    dataset = load_mner_dataset(data_dir)
    assert dataset["train"]["image"] == [None, None, None]
    assert len(dataset["train"]) == 3


def test_mner_tolerates_crlf_trailing_spaces_and_missing_final_blank_line(tmp_path):
    clean = tmp_path / "clean.txt"
    clean.write_text(MNER_TRAIN, encoding="utf-8")
    messy = tmp_path / "messy.txt"
    messy_text = MNER_TRAIN.replace("\n", "  \r\n").rstrip()  # trailing spaces, CRLF, no final newline
    messy.write_bytes(messy_text.encode("utf-8"))
    expected = load_mner_dataset(data_files={"train": clean})["train"]
    got = load_mner_dataset(data_files={"train": messy})["train"]
    assert got["tokens"] == expected["tokens"]
    assert got["ner_tags"] == expected["ner_tags"]


def test_utf8_byte_order_mark_is_accepted_by_both_loaders(tmp_path):
    (tmp_path / "train.txt").write_text("\ufeff" + MNER_TRAIN, encoding="utf-8")
    train = load_mner_dataset(data_files={"train": tmp_path / "train.txt"})["train"]
    assert train["image_id"][0] == "101.jpg" and train["tokens"][0][0] == "Kevin"
    (tmp_path / "mnre_train.txt").write_text("\ufeff" + "\n".join(MRE_TRAIN), encoding="utf-8")
    mre = load_mre_dataset(data_files={"train": tmp_path / "mnre_train.txt"})["train"]
    assert mre["tokens"][0][0] == "JFK" and len(mre) == 3


def test_non_utf8_bytes_name_file_and_line_in_both_loaders(tmp_path):
    latin1 = MNER_TRAIN.replace("Boston", "Montréal").encode("latin-1")  # é is the single byte 0xe9
    (tmp_path / "train.txt").write_bytes(latin1)
    with pytest.raises(ValueError, match=r"train.txt:5: byte 0xe9 at column 6 is not UTF-8"):
        load_mner_dataset(data_files={"train": tmp_path / "train.txt"})
    lines = [*MRE_TRAIN[:2], MRE_TRAIN[2].replace("Paris", "Paré")]
    (tmp_path / "mnre_train.txt").write_bytes("\n".join(lines).encode("cp1252"))
    with pytest.raises(ValueError, match=r"mnre_train.txt:3: byte 0xe9 .* is not UTF-8"):
        load_mre_dataset(data_files={"train": tmp_path / "mnre_train.txt"})


def test_mner_accepts_conlleval_style_i_tags(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("IMGID:1\nsome\tO\nBoston\tI-LOC\n", encoding="utf-8")
    tags = load_mner_dataset(data_files={"train": path})["train"]["ner_tags"][0]
    assert tags == [MNER_LABELS.index("O"), MNER_LABELS.index("I-LOC")]


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("IMGID:1\nKevin B-PER\n", 2, "TAB"),
        ("IMGID:1\nKevin\tB-PER\nDurant\tE-PER\n", 3, "E-PER"),
        ("IMGID:1\nKevin\tB-FOO\n", 2, "B-FOO"),
        ("Kevin\tB-PER\n", 1, "outside an IMGID block"),
        ("IMGID:1\n\nIMGID:2\nx\tO\n", 1, "no token lines"),
    ],
)
def test_mner_malformed_input_names_file_and_line(tmp_path, text, line, message):
    path = tmp_path / "train.txt"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=f"train.txt:{line}:.*{message}"):
        load_mner_dataset(data_files={"train": path})


def test_mner_missing_and_unreadable_images_are_masked_and_counted(tmp_path, caplog):
    data_dir, image_dir = write_mner_dir(tmp_path, images=("101",))
    (image_dir / "102.jpg").write_bytes(b"not an image at all")  # 103.jpg does not exist
    with caplog.at_level(logging.WARNING, logger="hvpnet_hf.loading"):
        train = load_mner_dataset(data_files={"train": data_dir / "train.txt"}, image_dir=image_dir)["train"]
    assert len(train) == 3
    assert train["image"] == [str(image_dir / "101.jpg"), None, None]
    assert "2 of 3 image files missing or unreadable" in caplog.text


def test_mner_missing_image_error_policy_names_file_and_line(tmp_path):
    data_dir, image_dir = write_mner_dir(tmp_path, images=("101", "102"))
    with pytest.raises(FileNotFoundError, match=r"train.txt:12: image file .*103.jpg"):
        load_mner_dataset(data_files={"train": data_dir / "train.txt"}, image_dir=image_dir, missing_images="error")


def test_unknown_missing_image_policy(tmp_path):
    data_dir, _ = write_mner_dir(tmp_path)
    with pytest.raises(ValueError, match="missing_images"):
        load_mner_dataset(data_dir, missing_images="skip")


@pytest.mark.parametrize("keying", ["file_name", "int_index", "str_index"])
def test_mner_crop_maps_keyed_by_file_name_or_sample_index(tmp_path, keying):
    data_dir, image_dir = write_mner_dir(tmp_path)
    crop_dir = tmp_path / "twitter2015_aux_images" / "train" / "crops"
    for name in ("101_crop0.png", "101_crop1.png", "103_crop0.png"):
        write_image(crop_dir / name, size=(8, 8))
    crops = {0: ["101_crop0.png", "101_crop1.png"], 2: ["103_crop0.png", "103_missing.png"]}
    keys = {"file_name": lambda i: f"{101 + i}.jpg", "int_index": int, "str_index": str}[keying]
    map_path = tmp_path / "twitter2015_train_dict.pth"
    torch.save({keys(index): names for index, names in crops.items()}, map_path)

    train = load_mner_dataset(
        data_files={"train": data_dir / "train.txt"},
        image_dir=image_dir,
        object_dir={"train": crop_dir},
        object_maps={"train": map_path},
    )["train"]
    assert train["objects"] == [
        [str(crop_dir / "101_crop0.png"), str(crop_dir / "101_crop1.png")],
        [],
        [str(crop_dir / "103_crop0.png"), None],  # a missing crop is kept as an absent slot
    ]


def test_an_object_dir_without_any_of_the_listed_crops_is_an_error(tmp_path):
    data_dir, image_dir = write_mner_dir(tmp_path)
    wrong_dir = tmp_path / "elsewhere"
    wrong_dir.mkdir()
    with pytest.raises(FileNotFoundError, match=r"none of the 3 object crops .* train split .*elsewhere"):
        load_mner_dataset(
            data_files={"train": data_dir / "train.txt"},
            image_dir=image_dir,
            object_dir=wrong_dir,
            object_maps={"train": {0: ["101_crop0.png", "101_crop1.png"], 2: ["103_crop0.png"]}},
        )


def test_crop_map_with_unmatched_keys_is_an_error(tmp_path):
    data_dir, _ = write_mner_dir(tmp_path)
    for crop_map, message in (({"999.jpg": ["x.png"]}, "match neither"), ({7: ["x.png"]}, "index 7 >= 3")):
        with pytest.raises(ValueError, match=message):
            load_mner_dataset(
                data_files={"train": data_dir / "train.txt"},
                object_dir=tmp_path,
                object_maps={"train": crop_map},
            )


def test_crop_maps_need_object_dir(tmp_path):
    data_dir, _ = write_mner_dir(tmp_path)
    with pytest.raises(ValueError, match="object_dir"):
        load_mner_dataset(data_files={"train": data_dir / "train.txt"}, object_maps={"train": {0: ["a.png"]}})


def test_missing_data_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no data file of a split in {tmp_path}: .*train.txt, valid.txt"):
        load_mner_dataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_mner_dataset(data_files={"train": tmp_path / "nope.txt"})


def test_mner_finds_its_split_files_by_the_names_mnre_uses(tmp_path):
    data_dir, _ = write_mner_dir(tmp_path)
    (data_dir / "valid.txt").rename(data_dir / "twitter_dev.txt")
    found = [(split, len(examples)) for split, examples in load_mner_dataset(data_dir).items()]
    assert found == [("train", 3), ("validation", 1), ("test", 2)]  # in this order, whatever the file names
    (data_dir / "valid.txt").write_text("IMGID:201\nParis\tB-LOC\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="look like the validation split: .*twitter_dev.txt.*valid.txt"):
        load_mner_dataset(data_dir)


# ---------------------------------------------------------------- MNRE


def test_mre_finds_release_file_names_including_a_space(tmp_path):
    data_dir = write_mre_dir(tmp_path)
    dataset = load_mre_dataset(data_dir)
    assert {split: len(dataset[split]) for split in dataset} == {"train": 3, "validation": 1, "test": 1}
    train = dataset["train"]
    assert train["head"][1] == {"name": "Messi", "start": 0, "end": 1}
    assert train["tail"][1] == {"name": "Inter Miami", "start": 2, "end": 4}
    assert train["image_id"] == ["img_1.jpg", "img_2.jpg", "img_1.jpg"]
    assert train["image"] == [None, None, None]
    names = train.features["relation"].names
    # Collected from all splits, sorted, "None" first.
    assert names == ["None", "/per/loc/place_of_residence", "/per/org/member_of", "/per/per/peer"]
    assert [names[r] for r in train["relation"]] == ["/per/per/peer", "/per/org/member_of", "None"]


@pytest.mark.parametrize(
    "name, split",
    [("ours_val.txt", "validation"), ("mnre_val .txt", "validation"), ("mre_dev.txt", "validation"),
     ("valid.txt", "validation"), ("mnre_train.txt", "train"), ("test.txt", "test"), ("trainee.txt", None),
     ("validation.txt", None)],
)  # fmt: skip
def test_split_of_file_reads_the_release_names(name, split):
    assert split_of_file(name) == split


def test_split_of_alias_reads_the_release_names_only():
    assert [split_of_alias(name) for name in ("val", "dev", "valid", "train", "test")] == [
        "validation",
        "validation",
        "validation",
        "train",
        "test",
    ]
    assert split_of_alias("validation") is None and split_of_alias("Dev") is None


def test_release_layout_needs_the_crop_maps(tmp_path):
    (tmp_path / "crops").mkdir()
    with pytest.raises(ValueError, match="crop maps"):
        find_release_layout(object_dir=tmp_path / "crops")
    with pytest.raises(FileNotFoundError, match=r"no crop map .* in " + str(tmp_path)):
        find_release_layout(object_dir=tmp_path / "crops", object_map_dir=tmp_path)
    # Sub-folders named after only some splits still count as a per-split layout; a plain folder is used as is.
    (tmp_path / "images" / "dev").mkdir(parents=True)
    assert find_release_layout(tmp_path / "images")["image_dir"] == {"validation": str(tmp_path / "images" / "dev")}
    assert find_release_layout(tmp_path / "crops")["image_dir"] == tmp_path / "crops"


def test_a_data_file_gets_the_folders_and_crop_map_of_its_split(tmp_path):
    for folder in ("img_org/val", "img_org/test", "img_vg/test/crops", "txt"):
        (tmp_path / folder).mkdir(parents=True)
    for split in ("dev", "test"):
        torch.save({}, tmp_path / "txt" / f"mre_{split}_dict.pth")
    data_file = tmp_path / "txt" / "ours_test.txt"
    assert find_file_layout(data_file, tmp_path / "img_org", tmp_path / "img_vg") == {
        "data_files": {"test": data_file},
        "image_dir": str(tmp_path / "img_org" / "test"),
        "object_dir": str(tmp_path / "img_vg" / "test" / "crops"),
        "object_maps": {"test": str(tmp_path / "txt" / "mre_test_dict.pth")},
    }
    # Flat folders and a named crop map are taken as given.
    flat = find_file_layout(data_file, tmp_path / "flat", tmp_path / "img_vg" / "test" / "crops", "own_map.pth")
    assert (flat["image_dir"], flat["object_maps"]) == (tmp_path / "flat", {"test": "own_map.pth"})


def test_a_data_file_without_its_split_in_a_per_split_layout_is_an_error(tmp_path):
    (tmp_path / "img_org" / "test").mkdir(parents=True)
    with pytest.raises(ValueError, match="image_dir .*img_org is laid out per split .* not named in its file name"):
        find_file_layout(tmp_path / "records.txt", tmp_path / "img_org")
    with pytest.raises(ValueError, match="image_dir .*img_org is laid out per split .* is not among them"):
        find_file_layout(tmp_path / "ours_train.txt", tmp_path / "img_org")
    with pytest.raises(FileNotFoundError, match="no crop map .* name the crop map of .*records.txt with object_map"):
        find_file_layout(tmp_path / "records.txt", object_dir=tmp_path / "img_org" / "test")


def test_mre_other_release_names(tmp_path):
    data_dir = write_mre_dir(tmp_path, names=("ours_train.txt", "ours_dev.txt", "ours_test.txt"))
    assert sorted(load_mre_dataset(data_dir)) == ["test", "train", "validation"]


def test_mre_ambiguous_file_names(tmp_path):
    data_dir = write_mre_dir(tmp_path)
    (data_dir / "old_train.txt").write_text(MRE_TRAIN[0])
    with pytest.raises(ValueError, match="look like the train split"):
        load_mre_dataset(data_dir)


def test_mre_rel2id_fixes_ids_and_rejects_unknown_relations(tmp_path):
    data_dir = write_mre_dir(tmp_path)
    rel2id = {"None": 0, "/per/per/peer": 1, "/per/org/member_of": 2, "/per/loc/place_of_residence": 3}
    rel2id_path = tmp_path / "ours_rel2id.json"
    rel2id_path.write_text(json.dumps(rel2id))
    dataset = load_mre_dataset(data_dir, rel2id=rel2id_path)
    assert dataset["train"].features["relation"].names == list(rel2id)
    assert dataset["train"]["relation"] == [1, 2, 0]

    del rel2id["/per/org/member_of"]
    rel2id["/per/loc/place_of_residence"] = 2
    with pytest.raises(ValueError, match=r"mnre_train.txt:2: relation '/per/org/member_of' is not in rel2id"):
        load_mre_dataset(data_dir, rel2id=rel2id)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (mre_line(["a", "b"], (0, 1), (1, 3), "None"), r"t span \[1, 3\) is out of range"),
        (mre_line(["a", "b"], (1, 1), (0, 1), "None"), r"h span \[1, 1\) is out of range"),
        ("{'token': ['a'], 'h': ", "not a Python literal"),
        ("{'token': ['a'], 'h': {'name': 'a', 'pos': [0, 1]}}", "field 't' is missing"),
        ("__import__('os')", "not a Python literal"),  # parsed with ast.literal_eval, never evaluated
    ],
)
def test_mre_malformed_input_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "mnre_train.txt"
    path.write_text(MRE_TRAIN[0] + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"mnre_train.txt:2: {message}"):
        load_mre_dataset(data_files={"train": path})


def test_mre_overlapping_head_and_tail_are_kept_counted_and_named(tmp_path, caplog):
    lines = [
        *MRE_TRAIN,
        mre_line(["Inter", "Miami", "CF"], (0, 2), (1, 3), "None"),
        mre_line(["New", "York"], (0, 2), (0, 2), "None"),
    ]
    (tmp_path / "mnre_train.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="hvpnet_hf.loading"):
        train = load_mre_dataset(data_files={"train": tmp_path / "mnre_train.txt"})["train"]
    assert len(train) == 5
    assert "mnre_train.txt: 2 of 5 records have overlapping head and tail spans (first: line 4)" in caplog.text


def test_mre_per_split_image_folders_and_index_keyed_crops(tmp_path):
    data_dir = write_mre_dir(tmp_path)
    image_dirs = {split: tmp_path / "img_org" / split for split in ("train", "val", "test")}
    write_image(image_dirs["train"] / "img_1.jpg", mode="L")
    write_image(image_dirs["train"] / "img_2.jpg", mode="CMYK")
    write_image(image_dirs["val"] / "a.jpg")
    crop_dir = tmp_path / "img_vg" / "train" / "crops"
    write_image(crop_dir / "c.png", mode="RGBA")
    dataset = load_mre_dataset(
        data_dir,
        image_dir={"train": image_dirs["train"], "validation": image_dirs["val"], "test": image_dirs["test"]},
        object_dir={"train": crop_dir},
        object_maps={"train": {1: ["c.png"]}},
    )
    assert dataset["train"]["image"] == [str(image_dirs["train"] / f"img_{i}.jpg") for i in (1, 2, 1)]
    assert dataset["train"]["objects"] == [[], [str(crop_dir / "c.png")], []]
    assert dataset["validation"]["image"] == [str(image_dirs["val"] / "a.jpg")]
    assert dataset["test"]["image"] == [None]  # test folder is empty: masked


def test_mre_image_dir_mapping_must_cover_every_split(tmp_path):
    data_dir = write_mre_dir(tmp_path)
    with pytest.raises(ValueError, match="image_dir has no entry for split 'validation'"):
        load_mre_dataset(data_dir, image_dir={"train": tmp_path, "test": tmp_path})


# ---------------------------------------------------------------- image checks


def test_decompression_bombs_are_masked_and_named_or_an_error(tmp_path, monkeypatch, caplog):
    data_dir, image_dir = write_mner_dir(tmp_path)
    write_image(image_dir / "102.jpg", size=(200, 100))
    # PIL refuses images of more than twice MAX_IMAGE_PIXELS; lowered here instead of writing a huge file.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)
    with caplog.at_level(logging.WARNING, logger="hvpnet_hf.loading"):
        train = load_mner_dataset(data_files={"train": data_dir / "train.txt"}, image_dir=image_dir)["train"]
    assert train["image"] == [str(image_dir / "101.jpg"), None, str(image_dir / "103.jpg")]
    assert "1 of 3 image files" in caplog.text and "102.jpg" in caplog.text and "decompression bomb" in caplog.text
    with pytest.raises(FileNotFoundError, match=r"train.txt:7: image file .*102.jpg .*decompression bomb"):
        load_mner_dataset(data_files={"train": data_dir / "train.txt"}, image_dir=image_dir, missing_images="error")


# ---------------------------------------------------------------- labels on a model's ids


def test_a_stream_is_put_on_the_models_ids_only_when_they_are_its_own():
    rows_read = []

    def rows():
        rows_read.append(1)
        yield {"ner_tags": [1, 0]}

    tags = Features({"ner_tags": List(ClassLabel(names=["O", "B-PER"]))})
    stream = IterableDataset.from_generator(rows, features=tags, split="test")
    assert labels_on_model_ids(stream, "ner_tags", {0: "O", 1: "B-PER"}, "tagger") is stream
    with pytest.raises(ValueError, match=r"the streamed test split has the labels \['O', 'B-PER'\] in 'ner_tags'"):
        labels_on_model_ids(stream, "ner_tags", {0: "B-PER", 1: "O"}, "tagger")
    assert not rows_read  # refused before the stream is read
