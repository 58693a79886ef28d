"""The grounding head (`HVPNetForGroundedTokenClassification`), its Auto class and remote code, and the
`multimodal-gmner` pipeline."""

import pytest
import torch
from modeling_utils import tiny_config, tiny_inputs, tiny_task_model
from PIL import Image
from test_hub_round_trip import BLOCKED, run_offline
from transformers import AutoModelForTokenClassification, AutoModelForZeroShotObjectDetection, pipeline

from hvpnet_hf import HVPNetForGroundedTokenClassification, HVPNetForTokenClassification, MultimodalGroundedNerPipeline
from hvpnet_hf.modeling_hvpnet import region_targets
from hvpnet_hf.tasks import task_of

NUM_CANDIDATES = 2  # the tiny configurations' object slots
WORDS = [["Kevin", "Durant", "enters", "Oracle", "Arena"], ["Alice", "met", "Bob", "in", "Paris"]]
TAGS = [[1, 2, 0, 5, 6], [1, 0, 1, 0, 3]]  # MNER_LABELS ids: B-PER I-PER O B-ORG I-ORG / B-PER O B-PER O B-LOC
# Word spans of the tagged entities, and which candidate is each one's region (None: ungroundable).
SPANS = [[[0, 2], [3, 5], [-100, -100]], [[0, 1], [2, 3], [4, 5]]]
REGIONS = [[1, None, None], [0, 1, None]]


def grounded_model_and_processor(seed: int = 0):
    ner_model, processor = tiny_task_model("ner", seed)
    torch.manual_seed(seed)
    return HVPNetForGroundedTokenClassification(ner_model.config), processor


def toy_batch(processor, image) -> dict:
    """Two tweets with their image and two distinct crops each, NER tags, gold spans and one-hot region targets."""
    crops = [[Image.new("RGB", (20, 20), color) for color in ((250, 10, 10), (10, 10, 250))]] * 2
    batch = dict(processor([image, image], WORDS, crops, word_labels=TAGS))
    batch["entity_spans"] = torch.tensor(SPANS)
    batch["region_labels"] = torch.stack(
        [
            torch.stack(
                [region_targets(torch.arange(NUM_CANDIDATES) == (-1 if region is None else region)) for region in row]
            )
            for row in REGIONS
        ]
    )
    return batch


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("grounding") / "tweet.png"
    Image.new("RGB", (64, 48), (30, 160, 60)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def trained(image):
    """A tiny grounding model trained on the toy batch until its loss is low, with its processor and loss curve."""
    model, processor = grounded_model_and_processor()
    batch = toy_batch(processor, image)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    model.train()
    for _ in range(40):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return model.eval(), processor, batch, losses


def test_outputs_have_the_documented_shapes_and_the_ner_head_is_the_ner_models():
    model = HVPNetForGroundedTokenClassification(tiny_config()).eval()
    inputs = tiny_inputs()
    word_start_mask = inputs["attention_mask"].bool()
    spans = torch.tensor([[[0, 2], [2, 3]], [[1, 4], [-100, -100]], [[0, 1], [-100, -100]]])
    with torch.no_grad():
        output = model(**inputs, word_start_mask=word_start_mask, entity_spans=spans)
    assert output.logits.shape == (3, 9, 5)
    assert output.region_logits.shape == (3, 2, NUM_CANDIDATES + 1)
    assert output.candidate_embeddings.shape == (3, NUM_CANDIDATES, 32)
    assert output.candidate_mask.all() and output.loss is None
    assert (output.region_logits[1:, 1] == torch.finfo(torch.float32).min).all()  # padding entities
    # The emissions are those of the NER head on the same weights: the prefix is built from the slot features.
    ner = HVPNetForTokenClassification(model.config).eval()
    ner.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        ner_logits = ner(**inputs).logits
    # 1e-6: the same operations on the same weights; only the route of the backbone features differs.
    torch.testing.assert_close(output.logits, ner_logits, atol=1e-6, rtol=0)


def test_region_targets_spread_over_matching_candidates_or_go_to_none():
    torch.testing.assert_close(region_targets(torch.tensor([True, False, True])), torch.tensor([0.5, 0.0, 0.5, 0.0]))
    torch.testing.assert_close(region_targets(torch.tensor([False, False])), torch.tensor([0.0, 0.0, 1.0]))


def test_absent_candidates_cannot_be_chosen_and_without_images_every_entity_is_none():
    model = HVPNetForGroundedTokenClassification(tiny_config()).eval()
    inputs = tiny_inputs()
    image_mask = torch.ones(3, 1 + NUM_CANDIDATES, dtype=torch.bool)
    image_mask[:, 2] = False  # candidate 1 absent everywhere
    spans = torch.tensor([[[0, 2]], [[1, 3]], [[0, 1]]])
    word_start_mask = inputs["attention_mask"].bool()
    with torch.no_grad():
        masked = model(**inputs, image_mask=image_mask, word_start_mask=word_start_mask, entity_spans=spans)
        text_only = model(input_ids=inputs["input_ids"], word_start_mask=word_start_mask, entity_spans=spans)
    assert (masked.region_logits.softmax(dim=-1)[..., 1] == 0).all()
    assert not masked.candidate_mask[:, 1].any() and masked.candidate_mask[:, 0].all()
    torch.testing.assert_close(text_only.region_logits.softmax(dim=-1)[..., -1], torch.ones(3, 1))


def test_training_on_gold_spans_lowers_the_loss_and_decode_grounds_the_crf_entities(trained):
    model, _, batch, losses = trained
    assert losses[-1] < 0.2 * losses[0], losses
    with torch.no_grad():
        output = model(**{key: value for key, value in batch.items() if key not in ("labels", "region_labels")})
    entities = model.decode_entities(output, batch["word_start_mask"])
    expected = [
        [
            {"start": start, "end": end, "type": label, "candidate": region}
            for (start, end), label, region in zip(spans, types, regions, strict=False)
        ]
        for spans, types, regions in zip(SPANS, [["PER", "ORG"], ["PER", "PER", "LOC"]], REGIONS, strict=True)
    ]
    assert [[{k: v for k, v in entity.items() if k != "score"} for entity in row] for row in entities] == expected
    assert all(0.5 < entity["score"] <= 1.0 for row in entities for entity in row)


def test_bad_grounding_inputs_are_named(trained):
    model, _, batch, _ = trained
    with pytest.raises(ValueError, match=r"entity_spans\[0, 1\] = \[3, 9\] is not a word span"):
        model(**{**batch, "entity_spans": torch.tensor([[[0, 2], [3, 9], [-100, -100]], SPANS[1]])})
    with pytest.raises(ValueError, match="must be a distribution"):
        model(**{**batch, "region_labels": batch["region_labels"] * 2})
    on_absent = batch["image_mask"].clone()
    on_absent[0, 2] = False  # candidate 1 of the first tweet, the region of its first entity
    with pytest.raises(ValueError, match="candidate whose crop is absent"):
        model(**{**batch, "image_mask": on_absent})
    with pytest.raises(ValueError, match="region_labels were given without entity_spans"):
        model(**{key: value for key, value in batch.items() if key != "entity_spans"})
    with pytest.raises(ValueError, match="region_labels must have shape"):
        model(**{**batch, "region_labels": batch["region_labels"][..., 1:]})


@pytest.mark.parametrize("settings", [{"prefix_mode": "original"}, {"use_visual_prefix": False}])
def test_a_model_without_per_crop_features_is_refused(settings):
    with pytest.raises(ValueError, match="scores the object crops' own backbone features"):
        HVPNetForGroundedTokenClassification(tiny_config(**settings))


@pytest.fixture(scope="module")
def saved(trained, tmp_path_factory):
    """The trained model and its processor saved by its pipeline's `save_pretrained`."""
    model, processor, _, _ = trained
    folder = tmp_path_factory.mktemp("gmner_model")
    MultimodalGroundedNerPipeline(model=model, processor=processor).save_pretrained(folder)
    return str(folder)


def test_save_and_auto_classes_load_the_grounding_head(trained, saved, tiny_ner_dir):
    model, _, batch, _ = trained
    loaded = AutoModelForZeroShotObjectDetection.from_pretrained(saved).eval()
    assert type(loaded) is HVPNetForGroundedTokenClassification
    assert task_of(saved) == "gmner"
    assert type(AutoModelForTokenClassification.from_pretrained(tiny_ner_dir)) is HVPNetForTokenClassification
    inputs = {key: value for key, value in batch.items() if key not in ("labels", "region_labels")}
    with torch.no_grad():
        expected, got = model(**inputs), loaded(**inputs)
    # 1e-5: the same weights, read back from safetensors, on the same inputs; a fresh model may order its float
    # operations differently, which moves logits of magnitude ~10 by float32 rounding (~1e-6).
    torch.testing.assert_close(got.region_logits, expected.region_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=0)


def test_pipeline_returns_each_entitys_box_in_input_pixels(trained, image):
    model, processor, batch, _ = trained
    ner = MultimodalGroundedNerPipeline(model=model, processor=processor)
    crops = [Image.new("RGB", (20, 20), color) for color in ((250, 10, 10), (10, 10, 250))]
    boxes = [[4, 2, 30, 40], [33.5, 10, 60, 47]]
    result = ner({"text": " ".join(WORDS[1]), "image": image, "objects": crops, "boxes": boxes})
    assert [(entity["word"], entity["box"]) for entity in result] == [
        ("Alice", boxes[0]),
        ("Bob", boxes[1]),
        ("Paris", None),
    ]
    assert all(0.5 < entity["region_score"] <= 1.0 for entity in result)
    # Boxes alone: the pipeline cuts the crops from the image at the boxes, as these cut crops are read.
    cut = Image.open(image).convert("RGB")
    from_boxes = ner({"words": WORDS[1], "image": image, "boxes": boxes})
    from_crops = ner({"words": WORDS[1], "image": image, "objects": [cut.crop(box) for box in boxes], "boxes": boxes})
    assert [entity["box"] for entity in from_boxes] == [entity["box"] for entity in from_crops]
    assert [entity["region_score"] for entity in from_boxes] == pytest.approx(
        [entity["region_score"] for entity in from_crops], abs=1e-6
    )


def test_pipeline_names_bad_candidates(trained, image):
    model, processor, _, _ = trained
    ner = MultimodalGroundedNerPipeline(model=model, processor=processor)
    crop = Image.new("RGB", (20, 20))
    with pytest.raises(ValueError, match=r"'boxes'\[1\] = \[5, 5, 5, 9\] is empty"):
        ner({"text": "Alice met Bob", "image": image, "boxes": [[0, 0, 9, 9], [5, 5, 5, 9]]})
    with pytest.raises(ValueError, match="'objects' need their 'boxes'"):
        ner({"text": "Alice met Bob", "image": image, "objects": [crop]})
    with pytest.raises(ValueError, match="'objects' has 1 crops but 'boxes' has 2 boxes"):
        ner({"text": "Alice met Bob", "image": image, "objects": [crop], "boxes": [[0, 0, 9, 9], [1, 1, 9, 9]]})
    with pytest.raises(ValueError, match="takes one 'image'"):
        ner({"text": "Alice met Bob", "image": [image, image]})


def test_saved_folder_serves_its_pipeline_without_hvpnet_hf(trained, saved, image, tmp_path):
    model, processor, _, _ = trained
    example = {"text": " ".join(WORDS[0]), "image": image, "boxes": [[4, 2, 30, 40], [33, 10, 60, 47]]}
    expected = MultimodalGroundedNerPipeline(model=model, processor=processor)(example)
    registered = pipeline("multimodal-gmner", model=saved)
    assert type(registered) is MultimodalGroundedNerPipeline
    script = f"""
    import json
    import sys
    from transformers import pipeline

    pipe = pipeline(model={saved!r}, trust_remote_code=True)
    output = pipe({example!r})
    imported = sorted(module for module in sys.modules if module.split(".")[0] in {BLOCKED!r})
    print(json.dumps({{"module": type(pipe).__module__, "model": type(pipe.model).__name__, "output": output,
                      "imported": imported}}))
    """
    report = run_offline({"root": tmp_path}, script, block=True)
    assert report["imported"] == [] and report["module"].startswith("transformers_modules.")
    assert report["model"] == "HVPNetForGroundedTokenClassification"
    assert [
        {k: v for k, v in entity.items() if k not in ("score", "region_score")} for entity in report["output"]
    ] == [{k: v for k, v in entity.items() if k not in ("score", "region_score")} for entity in expected]
    # 1e-5: the same weights and inputs in another process; only the order of float operations may differ.
    for got, want in zip(report["output"], expected, strict=True):
        assert got["region_score"] == pytest.approx(want["region_score"], abs=1e-5)
