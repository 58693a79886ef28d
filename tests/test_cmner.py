"""
CMNER (Chinese multimodal NER on Weibo posts) from its published files to a trained model: the loader on fixtures
written here in that format (invented posts, CRLF line endings, several images per post), and examples/run_mner.py
on them with a Chinese WordPiece tokenizer built from the fixtures' characters.
"""

import logging
import os
import sys
from pathlib import Path

import pytest
import torch
from cmner_fixtures import POSTS, write_cmner
from PIL import Image
from transformers import BertConfig, BertModel, BertTokenizerFast

from hvpnet_hf import HVPNetProcessor
from hvpnet_hf.collating import HVPNetDataCollator, tokenize_and_align
from hvpnet_hf.loading import MNER_LABELS, check_images_found_in_splits, load_cmner_dataset

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
import run_mner  # noqa: E402


def test_cmner_reads_the_published_files_with_every_image_of_a_post(tmp_path, caplog):
    text_dir, image_dir = write_cmner(tmp_path)
    (image_dir / "Ef34Gh_broken.jpg").write_bytes(b"not a picture")
    with caplog.at_level(logging.WARNING, logger="hvpnet_hf.loading"):
        data = load_cmner_dataset(text_dir, image_dir=image_dir)

    assert {split: len(rows) for split, rows in data.items()} == {"train": 3, "validation": 1, "test": 1}
    train = data["train"]
    assert train["tokens"][0] == ["张", "伟", "在", "北", "京"]  # the BOM and the CR are not part of any character
    assert train.features["ner_tags"].feature.names == MNER_LABELS
    assert [[MNER_LABELS[tag] for tag in tags] for tags in train["ner_tags"]] == [tags for *_, tags in POSTS["train"]]
    assert train["image_id"] == ["Ab12Cd", "Ef34Gh", "Ij56Kl"]
    # Sorted by name; Ab12Cd9_x.jpg belongs to another WID; the unreadable file is left out and counted.
    assert train["image"] == [
        [str(image_dir / "Ab12Cd_a01.jpg"), str(image_dir / "Ab12Cd_zz9.jpg")],
        [str(image_dir / "Ef34Gh_k7.jpg")],
        [],
    ]
    assert train["objects"] == [[], [], []]
    assert "1 of 4 image files missing or unreadable" in caplog.text and "Ef34Gh_broken.jpg" in caplog.text
    assert "1 of 3 posts have no image file" in caplog.text and "WID Ij56Kl, line 14" in caplog.text
    assert data["test"]["image"] == [[str(image_dir / f"Qr90St_{suffix}.jpg") for suffix in "abc"]]


def test_cmner_lists_the_image_folder_once_per_split(tmp_path, monkeypatch):
    text_dir, image_dir = write_cmner(tmp_path)
    listed = []
    scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path: listed.append(path) or scandir(path))
    load_cmner_dataset(text_dir, image_dir=image_dir)
    assert [str(path) for path in listed].count(str(image_dir)) == 3  # not once per post (5)


def test_cmner_without_image_dir_is_text_only(tmp_path):
    text_dir, _ = write_cmner(tmp_path)
    assert load_cmner_dataset(text_dir)["train"]["image"] == [[], [], []]


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("WID:a\r\n张 B-PER\r\n", 2, "expected 'character<TAB>tag'"),
        ("WID:a\r\n张\tB-PRODUCT\r\n", 2, "tag 'B-PRODUCT' is not one of"),
        ("WID:a\r\n张\tB-OTHER\r\n", 2, "tag 'B-OTHER' is not one of"),
        ("\r\n张\tO\r\nWID:a\r\n伟\tO\r\n", 2, "character line before any WID header"),
        ("WID:a\r\n\r\nWID:b\r\n张\tO\r\n", 1, "WID header without character lines"),
        ("WID:a\r\n张\tO\r\n\r\nWID:b\r\n\r\n", 4, "WID header without character lines"),
        ("WID:\r\n张\tO\r\n", 1, "WID header without an id"),
    ],
)
def test_cmner_malformed_line_names_file_and_line(tmp_path, text, line, message):
    path = tmp_path / "train.txt"
    path.write_bytes(text.encode())
    with pytest.raises(ValueError, match=f"train.txt:{line}: {message}"):
        load_cmner_dataset(data_files={"train": path})


def test_cmner_post_without_images_under_the_error_policy_is_named(tmp_path):
    text_dir, image_dir = write_cmner(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"train.txt:14: post Ij56Kl has no image file Ij56Kl_\*.jpg in"):
        load_cmner_dataset(text_dir, image_dir=image_dir, missing_images="error")


def test_cmner_image_folder_without_any_post_image_is_refused(tmp_path):
    text_dir, _ = write_cmner(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    data = load_cmner_dataset(text_dir, image_dir=elsewhere)
    with pytest.raises(FileNotFoundError, match=r"none of the 3 images of the train split .*Ab12Cd_\*\.jpg"):
        check_images_found_in_splits(data, elsewhere, "image_dir", "mask the images")
    with pytest.raises(FileNotFoundError, match="image_dir .*missing is not a folder"):
        load_cmner_dataset(text_dir, image_dir=tmp_path / "missing")


def test_cmner_crop_maps_are_keyed_by_wid(tmp_path):
    text_dir, image_dir = write_cmner(tmp_path)
    Image.new("RGB", (8, 8)).save(image_dir / "crop.png")
    data = load_cmner_dataset(
        data_files={"train": text_dir / "train.txt"},
        image_dir=image_dir,
        object_dir=image_dir,
        object_maps={"train": {"Ef34Gh": ["crop.png"]}},
    )
    assert data["train"]["objects"] == [[], [str(image_dir / "crop.png")], []]


def chinese_text_model(folder: Path) -> str:
    """A tiny random BERT with a WordPiece vocabulary of the fixtures' characters (as bert-base-chinese splits Chinese
    text: one character a token), saved like a Hub checkpoint."""
    characters = sorted({character for posts in POSTS.values() for _, text, _ in posts for character in text})
    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *characters]
    tokenizer = BertTokenizerFast(vocab={token: index for index, token in enumerate(vocabulary)})
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37
    )
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_cmner_posts_fill_image_slots_with_their_pictures(tmp_path):
    text_dir, image_dir = write_cmner(tmp_path)
    tokenizer = BertTokenizerFast.from_pretrained(chinese_text_model(tmp_path / "bert"))
    processor = HVPNetProcessor(tokenizer, task="ner", image_size=32, num_object_images=2)
    train = load_cmner_dataset(text_dir, image_dir=image_dir)["train"]
    encoded = train.map(tokenize_and_align, batched=True, fn_kwargs={"processor": processor})
    assert tokenizer.unk_token_id not in encoded["input_ids"][0]  # every character is its own token
    batch = HVPNetDataCollator(processor)(list(encoded))
    # Ab12Cd: two pictures in slots 0 and 1; Ef34Gh: one; Ij56Kl: none, masked.
    assert batch["image_mask"].tolist() == [[True, True, False], [True, False, False], [False, False, False]]
    assert not torch.equal(batch["pixel_values"][0, 0], batch["pixel_values"][0, 1])


def test_run_mner_trains_and_predicts_on_cmner_files(tmp_path):
    text_dir, image_dir = write_cmner(tmp_path)
    output_dir = tmp_path / "run"
    flags = [
        "--dataset", "cmner",
        "--data_dir", str(text_dir),
        "--image_dir", str(image_dir),
        "--text_model_name_or_path", chinese_text_model(tmp_path / "bert"),
        "--vision_backbone", "test_resnet",
        "--image_size", "32",
        "--config_overrides", "num_object_images=2",
        "--output_dir", str(output_dir),
        "--feature_cache_dir", str(tmp_path / "feature_cache"),
        "--max_steps", "2",
        "--per_device_train_batch_size", "2",
        "--learning_rate", "1e-3",
        "--disable_tqdm", "true",
        "--dataloader_pin_memory", "false",
        "--report_to", "none",
    ]  # fmt: skip
    results = run_mner.main(flags)

    assert "train_loss" in results and "eval_f1" in results and results["test_ORG_number"] == 1
    rows = (output_dir / "test_predictions.txt").read_text(encoding="utf-8").split()
    assert rows[::3] == list("小米发布会")  # one CoNLL row a character: character, gold tag, predicted tag
    assert "cmner" in (output_dir / "README.md").read_text(encoding="utf-8")
