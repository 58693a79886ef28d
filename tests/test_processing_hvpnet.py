"""HVPNetProcessor: word alignment, long texts in overflow rows, entity markers and truncation, padding, the call in
transformers' shape, settings from a backbone, save/load round trip.

The image part (decoding, transform, object slots) is tested in test_image_processing_hvpnet.py."""

import json

import pytest
import torch
from modeling_utils import TINY_TEXT
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor, BertConfig, BertModel, BertTokenizer

from hvpnet_hf import HVPNetForSequenceClassification  # importing hvpnet_hf registers the Auto classes
from hvpnet_hf.image_processing_hvpnet import HVPNetImageProcessor
from hvpnet_hf.loading import MNER_LABELS
from hvpnet_hf.processing_hvpnet import ENTITY_MARKERS, HVPNetProcessor, ner_word_positions

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "kevin", "du", "##rant", "plays", "in", "new", "york", "a"]
MODEL_INPUTS = {"input_ids", "attention_mask", "token_type_ids", "pixel_values", "image_mask"}
IMAGE_SIZE = 16


def tiny_tokenizer() -> BertTokenizer:
    """A WordPiece tokenizer over a dozen entries, lower-casing like bert-base-uncased."""
    return BertTokenizer(vocab={token: index for index, token in enumerate(VOCAB)})


def processor(task="ner", **kwargs) -> HVPNetProcessor:
    settings = {"image_size": IMAGE_SIZE, "crop_pct": 1.0, "image_mean": (0.5,) * 3, "image_std": (0.5,) * 3}
    return HVPNetProcessor(tiny_tokenizer(), task=task, **{**settings, **kwargs})


def tag(name: str) -> int:
    return MNER_LABELS.index(name)


# ---------------------------------------------------------------- NER


def test_ner_labels_sit_on_first_sub_words():
    ner = processor()
    words = ["Kevin", "Durant", "plays", "in", "New", "York"]
    tags = [tag("B-PER"), tag("I-PER"), tag("O"), tag("O"), tag("B-LOC"), tag("I-LOC")]
    encoded = ner.encode_ner([words], [tags])
    tokens = ner.tokenizer.convert_ids_to_tokens(encoded["input_ids"][0])
    assert tokens == ["[CLS]", "kevin", "du", "##rant", "plays", "in", "new", "york", "[SEP]"]
    assert encoded["labels"][0] == [-100, tags[0], tags[1], -100, *tags[2:], -100]
    assert encoded["word_start_mask"][0] == [False, True, True, False, True, True, True, True, False]
    assert encoded["word_ids"][0] == [-1, 0, 1, 1, 2, 3, 4, 5, -1]


def test_ner_words_that_tokenize_to_nothing_keep_the_alignment():
    ner = processor()
    # "\x07" and a zero-width space vanish in BERT's basic tokenizer; "😀" becomes [UNK] anyway.
    words = ["Kevin", "\x07", "Durant", "\u200b", "😀", "plays"]
    tags = [tag("B-PER"), tag("O"), tag("B-PER"), tag("O"), tag("O"), tag("O")]
    encoded = ner.encode_ner([words], [tags])
    tokens = ner.tokenizer.convert_ids_to_tokens(encoded["input_ids"][0])
    assert tokens == ["[CLS]", "kevin", "[UNK]", "du", "##rant", "[UNK]", "[UNK]", "plays", "[SEP]"]
    assert sum(encoded["word_start_mask"][0]) == len(words)
    assert [label for label in encoded["labels"][0] if label != -100] == tags


def test_ner_truncated_words_are_accounted_for():
    ner = processor(max_length=6)
    words = ["Kevin", "Durant", "plays", "in", "New", "York"]
    encoded = ner.encode_ner([words], [[tag("B-PER"), tag("I-PER"), 0, 0, tag("B-LOC"), tag("I-LOC")]])
    assert len(encoded["input_ids"][0]) == 6
    word_ids = encoded["word_ids"][0]
    assert sorted(set(word_ids) - {-1}) == [0, 1, 2]  # "in New York" were cut
    # The kept words are read at their first sub-words; the cut ones have no position.
    assert ner_word_positions([word_ids], len(words)) == [(0, 1), (0, 2), (0, 4), None, None, None]


def test_ner_tag_count_must_match_words():
    with pytest.raises(ValueError, match="Example 0: 2 words but 1 word_labels"):
        processor().encode_ner([["Kevin", "Durant"]], [[1]])


def test_ner_long_texts_are_read_in_the_tokenizers_overflow_rows():
    ner = processor()
    # 3 tokens in rows of 2 (max_length 4 less [CLS] and [SEP]), each next row repeating 1 token: the second row
    # starts inside "Durant", whose "##rant" is no word start there.
    rows = ner.encode_ner([["Durant", "kevin"]], [[1, 2]], max_length=4, stride=1, return_overflowing_tokens=True)
    assert [ner.tokenizer.convert_ids_to_tokens(row) for row in rows["input_ids"]] == [
        ["[CLS]", "du", "##rant", "[SEP]"],
        ["[CLS]", "##rant", "kevin", "[SEP]"],
    ]
    assert rows["overflow_to_sample_mapping"] == [0, 0]
    assert rows["word_ids"] == [[-1, 0, 0, -1], [-1, 0, 1, -1]]
    assert rows["word_start_mask"] == [[False, True, False, False], [False, False, True, False]]
    assert rows["labels"] == [[-100, 1, -100, -100], [-100, -100, 2, -100]]
    # Read from the word starts, "Durant" comes from the first row, which alone holds its first sub-word.
    assert ner_word_positions(rows["word_ids"], 2, rows["word_start_mask"]) == [(0, 1), (1, 2)]
    with pytest.raises(ValueError, match=r"stride must be in \[0, 2\) for max_length=4, got 2"):
        ner.encode_ner([["Durant", "kevin"]], max_length=4, stride=2, return_overflowing_tokens=True)


# ---------------------------------------------------------------- RE


def re_tokens(re_processor, encoded, index=0):
    return re_processor.tokenizer.convert_ids_to_tokens(encoded["input_ids"][index])


def test_re_markers_are_added_once_and_inserted_around_entities():
    re_processor = processor("re")
    vocab_size = len(re_processor.tokenizer)
    assert vocab_size == len(VOCAB) + 4
    assert HVPNetProcessor(re_processor.tokenizer, task="re").tokenizer is re_processor.tokenizer
    assert len(re_processor.tokenizer) == vocab_size  # not added twice
    assert re_processor.head_start_token_id == re_processor.tokenizer.convert_tokens_to_ids("<s>")
    assert re_processor.tail_start_token_id == vocab_size - 2

    words = ["Kevin", "Durant", "plays", "in", "New", "York"]
    encoded = re_processor.encode_re([words], [{"start": 4, "end": 6}], [{"start": 0, "end": 2}], [3])
    assert re_tokens(re_processor, encoded) == [
        "[CLS]", "<o>", "kevin", "du", "##rant", "</o>", "plays", "in", "<s>", "new", "york", "</s>", "[SEP]"
    ]  # fmt: skip
    assert encoded["labels"] == [3]
    assert encoded["attention_mask"][0] == [1] * 13


def test_re_markers_go_to_the_processors_copy_not_the_tokenizer_given(tmp_path):
    tokenizer = tiny_tokenizer()
    re_processor = HVPNetProcessor(tokenizer, task="re")
    assert len(tokenizer) == len(VOCAB) and "<s>" not in tokenizer.get_vocab()  # the caller's tokenizer is unchanged
    marker_ids = list(range(len(VOCAB), len(VOCAB) + 4))
    assert re_processor.tokenizer.convert_tokens_to_ids(ENTITY_MARKERS) == marker_ids
    re_processor.save_pretrained(tmp_path / "processor")
    assert HVPNetProcessor.from_pretrained(tmp_path / "processor").tokenizer.convert_tokens_to_ids(ENTITY_MARKERS) == (
        marker_ids
    )

    BertModel(BertConfig(**{**TINY_TEXT, "vocab_size": len(VOCAB)})).save_pretrained(tmp_path / "bert")
    model = HVPNetForSequenceClassification.from_text_vision_pretrained(
        str(tmp_path / "bert"), vision_backbone="test_resnet", processor=re_processor, num_labels=2
    )
    assert model.get_input_embeddings().num_embeddings == len(re_processor.tokenizer) == len(VOCAB) + 4


def test_re_entity_at_sentence_end_and_adjacent_entities():
    re_processor = processor("re")
    encoded = re_processor.encode_re([["a", "kevin", "york"]], [{"start": 1, "end": 2}], [{"start": 2, "end": 3}])
    assert re_tokens(re_processor, encoded) == ["[CLS]", "a", "<s>", "kevin", "</s>", "<o>", "york", "</o>", "[SEP]"]


def test_re_words_that_tokenize_to_nothing_become_unknown():
    re_processor = processor("re")
    encoded = re_processor.encode_re([["kevin", "\x07", "york"]], [{"start": 0, "end": 1}], [{"start": 2, "end": 3}])
    expected = ["[CLS]", "<s>", "kevin", "</s>", "[UNK]", "<o>", "york", "</o>", "[SEP]"]  # "\x07" kept as [UNK]
    assert re_tokens(re_processor, encoded) == expected


@pytest.mark.parametrize(("head", "tail"), [((97, 98), (99, 100)), ((0, 1), (99, 100)), ((99, 100), (50, 51))])
def test_re_truncation_keeps_both_entities_and_markers(head, tail):
    re_processor = processor("re", max_length=16)
    words = ["a"] * 100
    words[head[0]], words[tail[0]] = "kevin", "york"
    encoded = re_processor.encode_re(
        [words], [{"start": head[0], "end": head[1]}], [{"start": tail[0], "end": tail[1]}]
    )
    tokens = re_tokens(re_processor, encoded)
    assert len(tokens) == 16
    for marker in ENTITY_MARKERS:
        assert tokens.count(marker) == 1
    head_at, tail_at = tokens.index("<s>"), tokens.index("<o>")
    assert tokens[head_at : head_at + 3] == ["<s>", "kevin", "</s>"]
    assert tokens[tail_at : tail_at + 3] == ["<o>", "york", "</o>"]
    assert (head_at < tail_at) == (head[0] < tail[0])  # order of the sentence is kept


def test_re_span_out_of_range():
    with pytest.raises(ValueError, match=r"Example 0: tail span \[2, 4\) out of range"):
        processor("re").encode_re([["a", "b", "c"]], [{"start": 0, "end": 1}], [{"start": 2, "end": 4}])


def test_re_max_length_must_fit_the_markers():
    with pytest.raises(ValueError, match="max_length"):
        processor("re", max_length=5)
    with pytest.raises(ValueError, match="max_length"):
        processor("re").encode_re([["a", "b"]], [{"start": 0, "end": 1}], [{"start": 1, "end": 2}], max_length=4)


# ---------------------------------------------------------------- image settings


def test_image_settings_come_from_the_timm_backbone():
    from_cfg = HVPNetProcessor.from_backbone(tiny_tokenizer(), "test_resnet").image_processor
    assert (from_cfg.image_size, from_cfg.crop_pct, from_cfg.interpolation) == (160, 0.95, "bilinear")
    assert from_cfg.image_mean == (0.5, 0.5, 0.5)
    small = HVPNetProcessor.from_backbone(tiny_tokenizer(), "resnet50", image_size=64).image_processor
    assert small.image_size == 64 and small.image_std == (0.229, 0.224, 0.225)
    assert small.preprocess_example(Image.new("RGB", (100, 80)))["pixel_values"].shape == (4, 3, 64, 64)
    assert HVPNetProcessor.from_backbone(tiny_tokenizer(), "no_such_backbone").image_processor.image_size == 224


def test_image_settings_are_read_from_the_image_processor_only():
    # One place for the image settings: the processor neither mirrors them nor resizes images itself.
    ner = processor(num_object_images=2)
    assert ner.image_processor.num_object_images == 2
    for name in ("image_size", "num_object_images", "image_transform", "preprocess_images"):
        assert not hasattr(ner, name), name
    with pytest.raises(ValueError, match="either image_processor or image settings"):
        HVPNetProcessor(tiny_tokenizer(), image_processor=ner.image_processor, image_size=32)


# ---------------------------------------------------------------- __call__ and round trip


def test_call_returns_exactly_the_model_inputs():
    ner = processor()
    single = ner(Image.new("RGB", (20, 20)), ["Kevin", "plays"], [], word_labels=[1, 0])
    assert set(single) == MODEL_INPUTS | {"word_start_mask", "labels"}
    assert single["pixel_values"].shape == (1, 4, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert single["image_mask"].tolist() == [[True, False, False, False]]
    assert single["input_ids"].shape == (1, 4) and single["labels"].tolist() == [[-100, 1, 0, -100]]

    re_processor = processor("re")
    batch = re_processor(
        [None, Image.new("L", (20, 20))],
        [["Kevin", "plays"], ["a", "new", "york", "a"]],
        head=[{"start": 0, "end": 1}, {"start": 1, "end": 2}],
        tail=[{"start": 1, "end": 2}, {"start": 2, "end": 3}],
        labels=[2, 0],
    )
    assert set(batch) == MODEL_INPUTS | {"labels"}
    assert batch["input_ids"].shape == (2, 10)
    assert batch["attention_mask"].tolist()[0] == [1] * 8 + [0, 0]
    assert batch["image_mask"][:, 0].tolist() == [False, True]
    assert batch["labels"].tolist() == [2, 0]


def test_call_takes_the_images_first_and_refuses_the_other_tasks_inputs():
    ner = processor()
    with pytest.raises(ValueError, match=r"needs `text`.*processor\(images, words\)"):
        ner(["Kevin", "plays"])  # the words where the images go
    with pytest.raises(ValueError, match="an NER processor takes word_labels"):
        ner(text=["Kevin", "plays"], labels=1)
    with pytest.raises(ValueError, match="not word_labels"):
        processor("re")(
            text=["Kevin", "plays"], head={"start": 0, "end": 1}, tail={"start": 1, "end": 2}, word_labels=[1, 0]
        )


def test_padding_is_the_tokenizers_and_token_labels_follow_its_side():
    ner = processor()
    ner.tokenizer.padding_side = "left"
    batch = ner(text=[["Kevin"], ["Kevin", "plays"]], word_labels=[[1], [1, 0]], padding="max_length", max_length=6)
    assert batch["input_ids"].tolist()[0] == [0, 0, 0, 2, 5, 3]  # [PAD] [PAD] [PAD] [CLS] kevin [SEP]
    assert batch["attention_mask"].tolist()[0] == [0, 0, 0, 1, 1, 1]
    assert batch["word_start_mask"].tolist()[0] == [False] * 4 + [True, False]
    assert batch["labels"].tolist() == [[-100] * 4 + [1, -100], [-100, -100, -100, 1, 0, -100]]


def test_save_and_load_round_trip(tmp_path):
    # Every setting differs from its default, so a setting the loader ignored would show.
    re_processor = processor("re", crop_mode="squash", interpolation="bilinear", num_object_images=2, max_length=32)
    re_processor.save_pretrained(tmp_path)
    loaded = HVPNetProcessor.from_pretrained(tmp_path)
    assert len(loaded.tokenizer) == len(re_processor.tokenizer)
    assert loaded.head_start_token_id == re_processor.head_start_token_id
    assert (loaded.task, loaded.max_length) == (re_processor.task, re_processor.max_length)
    for name in (
        "image_size",
        "crop_pct",
        "crop_mode",
        "image_mean",
        "image_std",
        "interpolation",
        "num_object_images",
    ):
        assert getattr(loaded.image_processor, name) == getattr(re_processor.image_processor, name)
    arguments = (Image.new("RGB", (30, 20), (9, 99, 199)), ["Kevin", "plays", "in", "York"], [Image.new("L", (5, 5))])
    spans = {"head": {"start": 0, "end": 1}, "tail": {"start": 3, "end": 4}, "labels": 1}
    expected, got = re_processor(*arguments, **spans), loaded(*arguments, **spans)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)  # same settings: identical output


def test_a_flat_processor_config_is_refused_not_read_with_default_image_settings(tmp_path):
    # A processor_config.json with the image settings at its top level (no "image_processor" entry) is not a layout
    # this package writes; loading it is an error rather than a processor with default image settings.
    processor("re").tokenizer.save_pretrained(tmp_path)
    settings = {"processor_class": "HVPNetProcessor", "task": "re", "image_size": IMAGE_SIZE, "max_length": 32}
    (tmp_path / "processor_config.json").write_text(json.dumps(settings, indent=2))
    with pytest.raises(OSError, match="Can't load image processor"):
        HVPNetProcessor.from_pretrained(tmp_path)


def test_processor_and_image_processor_load_with_the_auto_classes(tmp_path):
    saved = processor("ner", crop_mode="squash", num_object_images=2, max_length=20)
    saved.save_pretrained(tmp_path)
    # The folder carries the processing code, for trust_remote_code=True where hvpnet_hf is not installed.
    assert {"processing_hvpnet.py", "image_processing_hvpnet.py"} <= {path.name for path in tmp_path.iterdir()}
    config = json.loads((tmp_path / "processor_config.json").read_text())
    assert config["auto_map"] == {"AutoProcessor": "processing_hvpnet.HVPNetProcessor"}
    assert (
        config["image_processor"]["auto_map"]["AutoImageProcessor"] == "image_processing_hvpnet.HVPNetImageProcessor"
    )
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, HVPNetProcessor) and isinstance(loaded.image_processor, HVPNetImageProcessor)
    assert (loaded.task, loaded.max_length) == ("ner", 20)
    assert (loaded.image_processor.crop_mode, loaded.image_processor.num_object_images) == ("squash", 2)
    image_processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(image_processor, HVPNetImageProcessor)
    assert image_processor.to_dict() == saved.image_processor.to_dict()
    image = Image.new("RGB", (30, 20), (9, 99, 199))
    batch = image_processor([image, None], [[image], []])
    assert batch["pixel_values"].shape == (2, 3, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert batch["image_mask"].tolist() == [[True, True, False], [False, False, False]]
    torch.testing.assert_close(
        batch["pixel_values"][0],
        saved.image_processor.preprocess_example(image, [image])["pixel_values"],
        rtol=0,
        atol=0,
    )
