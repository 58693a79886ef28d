"""The "multimodal-ner" and "multimodal-re" pipelines on raw inputs: text or words, PIL images, numpy arrays, paths or
none."""

import json
import random

import numpy as np
import pytest
import torch
from modeling_utils import RELATIONS, tiny_model_folder, tiny_task_model
from PIL import Image
from seqeval.metrics.sequence_labeling import get_entities
from transformers import AutoModelForTokenClassification, pipeline

from hvpnet_hf import HVPNetProcessor
from hvpnet_hf.loading import MNER_LABELS
from hvpnet_hf.pipelines import bio_entities  # importing the module registers the pipelines
from hvpnet_hf.processing_hvpnet import ner_word_positions

TEXT = "  Visiting   Liverpool with @anna_b today"


@pytest.fixture(scope="module")
def ner_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ner")
    model = tiny_model_folder(folder, "ner")
    # Emissions that favor B-PER then I-PER make the tags predictable: every word is tagged PER.
    with torch.no_grad():
        model.classifier.bias[MNER_LABELS.index("B-PER")] = 30.0
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for index, (color, mode) in enumerate([((200, 30, 30), "RGB"), ((20, 200, 40), "L"), ((10, 10, 220), "RGBA")]):
        path = folder / f"{index}.png"
        Image.new("RGB", (40, 30), color).convert(mode).save(path)
        paths.append(str(path))
    return paths


def test_ner_on_text_gives_word_and_character_spans(ner_folder, image_files):
    ner = pipeline("multimodal-ner", model=str(ner_folder))
    entities = ner({"text": TEXT, "image": Image.open(image_files[0]), "objects": image_files[1:]})
    words = TEXT.split()
    assert [entity["word"] for entity in entities] == words
    assert [(entity["word_start"], entity["word_end"]) for entity in entities] == [(i, i + 1) for i in range(5)]
    assert all(entity["entity_group"] == "PER" for entity in entities)
    for entity in entities:
        assert TEXT[entity["start"] : entity["end"]] == entity["word"]
        # The B-PER emission dominates by 30 logits: its probability is 1 up to float rounding.
        assert entity["score"] == pytest.approx(1.0, abs=1e-6)


def test_ner_on_words_and_text_only_and_long_texts(ner_folder, image_files):
    ner = pipeline("multimodal-ner", model=str(ner_folder))
    entities = ner({"words": ["Liverpool", "FC"], "image": image_files[2]})
    assert [(entity["word"], "start" in entity) for entity in entities] == [("Liverpool", False), ("FC", False)]
    assert len(ner("Liverpool today")) == 2  # a plain string: text only
    # 400 words do not fit max_length=24 (the processor's): they are read in several windows and every word is
    # tagged (this model tags every word it sees as PER), none is cut.
    words = [f"w{i}" for i in range(400)]
    assert len(ner.processor.encode_ner([words], return_overflowing_tokens=True)["input_ids"]) > 1
    long_entities = ner({"words": words})
    assert [entity["word_start"] for entity in long_entities] == list(range(400))
    assert [entity["word"] for entity in long_entities] == words


def test_ner_batches_equal_single_calls(ner_folder, image_files):
    ner = pipeline("multimodal-ner", model=str(ner_folder))
    inputs = [
        {"text": "Liverpool", "image": image_files[0]},
        {"text": TEXT, "objects": image_files[1:]},
        {"words": ["a", "much", "longer", "list", "of", "words", "here"], "image": image_files[2]},
    ]
    batched = ner(inputs, batch_size=2)
    single = [ner(example) for example in inputs]
    assert len(batched) == 3
    for batch_entities, single_entities in zip(batched, single, strict=True):
        assert [e["word"] for e in batch_entities] == [e["word"] for e in single_entities]
        # Batching pads text; padding must not change the scores beyond float noise.
        for batched_entity, single_entity in zip(batch_entities, single_entities, strict=True):
            assert batched_entity["score"] == pytest.approx(single_entity["score"], abs=1e-5)


def test_ner_input_errors(ner_folder, tmp_path):
    ner = pipeline("multimodal-ner", model=str(ner_folder))
    with pytest.raises(ValueError, match="'text' or 'words'"):
        ner({"image": None})
    with pytest.raises(OSError, match="missing.jpg"):
        ner({"text": "hello", "image": str(tmp_path / "missing.jpg")})
    # With the masking policy an unreadable image is treated as absent: the text-only prediction.
    masked = ner({"text": "hello", "image": str(tmp_path / "missing.jpg")}, missing_images="mask")
    assert masked == ner({"text": "hello"})


def test_re_relation_scores_and_top_k(tiny_re_dir, image_files):
    relation = pipeline("multimodal-re", model=str(tiny_re_dir))
    example = {
        "words": ["Alice", "and", "Bob", "at", "Anfield"],
        "head": (0, 1),
        "tail": {"start": 2, "end": 3},
        "image": image_files[0],
        "objects": [Image.open(image_files[1])],
    }
    best = relation(example)
    assert set(best) == {"relation", "score"} and best["relation"] in RELATIONS
    ranked = relation(example, top_k=10)
    assert [item["relation"] for item in ranked][0] == best["relation"]
    assert len(ranked) == len(RELATIONS)  # top_k is capped at the number of relations
    for top_k in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=rf"top_k must be a positive integer, got {top_k!r}"):
            relation(example, top_k=top_k)
    scores = [item["score"] for item in ranked]
    assert scores == sorted(scores, reverse=True) and sum(scores) == pytest.approx(1.0, abs=1e-5)
    # The image reaches the model: masking it changes the probabilities of this random model.
    without_image = relation({**example, "image": None, "objects": []}, top_k=10)
    assert {item["relation"]: item["score"] for item in without_image} != pytest.approx(
        {item["relation"]: item["score"] for item in ranked}, abs=1e-7
    )


def test_re_batches_and_span_errors(tiny_re_dir, image_files):
    relation = pipeline("multimodal-re", model=str(tiny_re_dir))
    inputs = [
        {"words": ["Alice", "met", "Bob"], "head": (0, 1), "tail": (2, 3), "image": image_files[0]},
        {"words": ["Bob", "lives", "in", "New", "York", "City"], "head": (0, 1), "tail": (3, 6)},
    ]
    batched = relation(inputs, batch_size=2, top_k=2)
    for batch_result, example in zip(batched, inputs, strict=True):
        single = relation(example, top_k=2)
        assert [item["relation"] for item in batch_result] == [item["relation"] for item in single]
        assert [item["score"] for item in batch_result] == pytest.approx([item["score"] for item in single], abs=1e-5)
    with pytest.raises(ValueError, match=r"tail span \[2, 9\) is not a word span of the 3-word input"):
        relation({"words": ["Alice", "met", "Bob"], "head": (0, 1), "tail": (2, 9)})
    with pytest.raises(ValueError, match="missing \\['tail'\\]"):
        relation({"words": ["Alice"], "head": (0, 1)})


def test_entities_are_read_from_tags_as_seqeval_reads_them():
    # The pipeline's file is saved with models and must not need seqeval; its reading must still be seqeval's, so
    # that the pipeline's entities are the ones the NER metric scores.
    generator = random.Random(0)
    tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "I-ORG"]
    sequences = [[generator.choice(tags) for _ in range(generator.randint(0, 12))] for _ in range(2000)]
    sequences += [["I-PER", "I-PER", "I-LOC"], ["B-PER", "B-PER", "I-PER"], ["O", "I-LOC"], []]
    for sequence in sequences:
        assert bio_entities(sequence) == get_entities(sequence), sequence


def _ner_inputs(image_files):
    return [
        {"text": "Liverpool", "image": image_files[0]},
        "",  # no words: no entities, and the other inputs of its batch are not disturbed
        {"words": [f"w{i}" for i in range(60)], "image": image_files[2]},  # read in several windows
        {"text": TEXT, "objects": image_files[1:]},
        "Kevin Durant",
    ]


def _re_inputs(image_files):
    return [
        {"words": ["Alice", "met", "Bob"], "head": (0, 1), "tail": (2, 3), "image": image_files[0]},
        {"words": ["Bob", "lives", "in", "New", "York", "City"], "head": (0, 1), "tail": (3, 6)},
        {"words": [f"w{i}" for i in range(80)], "head": (70, 71), "tail": (2, 4), "objects": image_files[1:]},
        {"words": ["Anna", "and", "Bo"], "head": {"start": 2, "end": 3}, "tail": (0, 1), "image": image_files[1]},
        {"words": ["x", "y"], "head": (1, 2), "tail": (0, 1)},
    ]


def runner_and_single_results(task: str, ner_folder, tiny_re_dir, image_files) -> tuple:
    """The pipeline of `task` on its tiny model, the task's example inputs, and each input's result alone."""
    folder, inputs = (
        (ner_folder, _ner_inputs(image_files)) if task == "ner" else (tiny_re_dir, _re_inputs(image_files))
    )
    runner = pipeline(f"multimodal-{task}", model=str(folder))
    return runner, inputs, [runner(example) for example in inputs]


@pytest.mark.parametrize("task", ["ner", "re"])
def test_lists_and_generators_give_single_call_results_at_every_batch_size(task, ner_folder, tiny_re_dir, image_files):
    runner, inputs, single = runner_and_single_results(task, ner_folder, tiny_re_dir, image_files)
    if task == "ner":
        assert single[1] == []
    for batch_size in (1, 2, 3):
        for count in range(1, len(inputs) + 1):
            for as_generator in (False, True):
                given = (example for example in inputs[:count]) if as_generator else inputs[:count]
                results = list(runner(given, batch_size=batch_size))
                assert len(results) == count, (batch_size, count, as_generator)
                for result, expected in zip(results, single, strict=False):
                    _assert_same_result(result, expected)


def _assert_same_result(result: dict | list[dict], expected: dict | list[dict]):
    """Equal entities or relations; scores equal up to float noise (padding to a batch's longest row)."""
    result, expected = (result, expected) if isinstance(result, list) else ([result], [expected])
    assert [{k: v for k, v in item.items() if k != "score"} for item in result] == [
        {k: v for k, v in item.items() if k != "score"} for item in expected
    ]
    assert [item["score"] for item in result] == pytest.approx([item["score"] for item in expected], abs=1e-5)


def test_long_text_windows_are_merged_from_the_farthest_window(tmp_path):
    # A random model (no bias): each word's tag must be the one its chosen window gives when run on its own.
    model = tiny_model_folder(tmp_path, "ner", seed=3)
    ner = pipeline("multimodal-ner", model=str(tmp_path))
    words = [random.Random(1).choice(["Liverpool", "a", "rendezvous", "@anna_b", "é", "🙂"]) for _ in range(90)]
    windows = ner.processor.encode_ner([words], stride=8, return_overflowing_tokens=True)
    assert len(windows["input_ids"]) > 2
    row_tags = []
    for row in range(len(windows["input_ids"])):
        features = {name: windows[name][row] for name in ("input_ids", "attention_mask", "token_type_ids")}
        features["word_start_mask"] = windows["word_start_mask"][row]
        features.update(ner.processor.image_processor.preprocess_example(None))
        with torch.no_grad():
            batch = ner.processor.pad([features])
            row_tags.append(model.eval().decode(model(**batch).logits, batch["word_start_mask"])[0].tolist())
    positions = ner_word_positions(windows["word_ids"], len(words), windows["word_start_mask"])
    expected = [MNER_LABELS[row_tags[row][token]] for row, token in positions]
    entities = ner({"words": words}, stride=8)
    predicted = ["O"] * len(words)
    for entity in entities:
        predicted[entity["word_start"] : entity["word_end"]] = [f"I-{entity['entity_group']}"] * (
            entity["word_end"] - entity["word_start"]
        )
        predicted[entity["word_start"]] = f"B-{entity['entity_group']}"
    assert [entity[:3] for entity in bio_entities(predicted)] == bio_entities(expected)


def test_each_word_is_read_from_the_window_where_it_is_farthest_from_a_cut():
    # Six words in two windows: [0, 4) is cut after word 3, [2, 6) before word 2. Word 2 is 1 word from the first
    # window's cut and 0 from the second's; word 3 the other way round. "##" continues the previous word.
    word_ids = [[-1, 0, 1, 1, 2, 3, -1], [-1, 2, 3, 4, 5, 5, -1]]
    positions = ner_word_positions(word_ids, 6)
    assert positions == [(0, 1), (0, 2), (0, 4), (1, 2), (1, 3), (1, 4)]
    # A single row that stops early (truncation) leaves the rest unread.
    assert ner_word_positions([[-1, 0, 1, -1]], 4) == [(0, 1), (0, 2), None, None]


def test_max_length_and_stride_are_checked(ner_folder, tiny_re_dir):
    ner = pipeline("multimodal-ner", model=str(ner_folder))
    limit = ner.model.config.text_config.max_position_embeddings
    with pytest.raises(ValueError, match=rf"max_position_embeddings \({limit}\), got {limit + 1}"):
        ner("hello", max_length=limit + 1)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        pipeline("multimodal-re", model=str(tiny_re_dir), max_length=limit * 2)
    with pytest.raises(ValueError, match="stride must be in"):
        ner("hello", stride=22)  # max_length 24 leaves 22 tokens per window
    with pytest.raises(ValueError, match="stride must be an integer, got 2.5"):
        ner("hello", stride=2.5)
    assert len(ner("a b c", max_length=limit)) == 3


def test_a_processor_with_more_crops_than_the_model_takes_is_refused(ner_folder):
    processor = HVPNetProcessor.from_pretrained(ner_folder)
    model = AutoModelForTokenClassification.from_pretrained(ner_folder)
    processor.image_processor.num_object_images = model.config.num_object_images + 1
    with pytest.raises(ValueError, match=rf"gives {model.config.num_object_images + 1} object crops .* at most"):
        pipeline("multimodal-ner", model=model, processor=processor)


def test_input_keys_and_types_are_checked(ner_folder, tiny_re_dir):
    ner = pipeline("multimodal-ner", model=str(ner_folder))
    relation = pipeline("multimodal-re", model=str(tiny_re_dir))
    with pytest.raises(TypeError, match="'words' must be a list of strings, got str \\(give a string as 'text'\\)"):
        ner({"words": "Kevin Durant"})
    with pytest.raises(ValueError, match=r"unknown input keys \['img'\]; accepted keys are \['text', 'words'"):
        ner({"text": "Kevin Durant", "img": "photo.jpg"})
    with pytest.raises(ValueError, match=r"unknown input keys \['img'\]; accepted keys are \['words', 'head'"):
        relation({"words": ["a", "b"], "head": (0, 1), "tail": (1, 2), "img": None})
    with pytest.raises(TypeError, match=r"'words'\[1\] must be a string, got int"):
        ner({"words": ["a", 3]})
    # In a list, the error names the input's index.
    with pytest.raises(TypeError, match=r"input 2: an input must be a dict .* got int"):
        ner(["a", {"text": "b"}, 7], batch_size=2)
    assert ner(["", "   "]) == [[], []]
    with pytest.raises(ValueError, match=r"head must be a \(start, end\) pair or \{'start', 'end'\}, got \(1,\)"):
        relation({"words": ["a", "b"], "head": (1,), "tail": (0, 1)})
    with pytest.raises(TypeError, match=r"tail span bounds must be integers, got \{'start': 0, 'end': 1.5\}"):
        relation({"words": ["a", "b"], "head": (1, 2), "tail": {"start": 0, "end": 1.5}})


@pytest.mark.parametrize("task", ["ner", "re"])
def test_pipelines_take_numpy_images_like_pil_images(tmp_path, task):
    # The processor's own conversion of arrays is tested in test_image_processing_hvpnet.py.
    tiny_model_folder(tmp_path, task)
    generator = np.random.default_rng(0)
    array = generator.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    gray = generator.integers(0, 256, (12, 12), dtype=np.uint8)
    example = {"words": ["Kevin", "Durant", "in", "Boston"]}
    if task == "re":
        example.update(head=(0, 2), tail=(3, 4))
    runner = pipeline("multimodal-ner" if task == "ner" else "multimodal-re", model=str(tmp_path))
    calls = []
    original_forward = runner.model.forward

    def recording_forward(**inputs):
        calls.append({name: value.clone() for name, value in inputs.items() if torch.is_tensor(value)})
        return original_forward(**inputs)

    runner.model.forward = recording_forward
    from_arrays = runner({**example, "image": array, "objects": [gray]})
    from_pil = runner({**example, "image": Image.fromarray(array), "objects": [Image.fromarray(gray)]})
    assert from_arrays == from_pil
    assert calls[0]["image_mask"][0].tolist() == [True, True, False]
    torch.testing.assert_close(calls[0]["pixel_values"], calls[1]["pixel_values"])


def test_a_saved_pipeline_loaded_from_its_own_code_leaves_the_package_tasks_alone(tmp_path, image_files):
    """Loading a folder's copy of the pipeline code (as `pipeline(model=folder, trust_remote_code=True)` does)
    imports a second `pipelines` module; the task names must keep pointing at the package's classes."""
    from transformers.pipelines import PIPELINE_REGISTRY

    from hvpnet_hf.pipelines import MultimodalNerPipeline, MultimodalRePipeline

    folder = tmp_path / "ner"
    tiny_model_folder(folder, "ner")
    remote = pipeline(model=str(folder), trust_remote_code=True)
    assert type(remote).__module__.startswith("transformers_modules.")
    assert PIPELINE_REGISTRY.check_task("multimodal-ner")[1]["impl"] is MultimodalNerPipeline
    assert PIPELINE_REGISTRY.check_task("multimodal-re")[1]["impl"] is MultimodalRePipeline
    assert type(pipeline("multimodal-ner", model=str(folder))) is MultimodalNerPipeline


def test_a_saved_model_records_its_pipeline_under_the_task_name(tmp_path):
    """config.json records the pipeline under the task's name, "ner"; the installed code serves "multimodal-ner".
    Folders saved with the earlier record, "hvpnet-ner", are served both ways as well."""
    from hvpnet_hf.pipelines import MultimodalNerPipeline

    folder = tmp_path / "ner"
    tiny_model_folder(folder, "ner")
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    assert list(config["custom_pipelines"]) == ["ner"]
    record = config["custom_pipelines"]["ner"]
    for key in ("ner", "hvpnet-ner"):
        config_file.write_text(json.dumps({**config, "custom_pipelines": {key: record}}))
        assert type(pipeline("multimodal-ner", model=str(folder))) is MultimodalNerPipeline
        remote = pipeline(model=str(folder), trust_remote_code=True)
        assert type(remote).__name__ == "MultimodalNerPipeline"
        assert type(remote).__module__.startswith("transformers_modules.")


@pytest.mark.parametrize("task", ["ner", "re"])
def test_workers_give_single_call_results_in_input_order(task, ner_folder, tiny_re_dir, image_files):
    runner, inputs, single = runner_and_single_results(task, ner_folder, tiny_re_dir, image_files)
    for batch_size in (1, 3):  # one input per batch, and batches that split the inputs unevenly
        results = runner(inputs, batch_size=batch_size, num_workers=2)
        assert len(results) == len(inputs), batch_size
        for result, expected in zip(results, single, strict=True):
            _assert_same_result(result, expected)
    with pytest.raises(TypeError, match=r"input 2: an input must be a dict .* got int"):
        runner([inputs[0], inputs[1], 7], batch_size=2, num_workers=2)


@pytest.mark.parametrize("task", ["ner", "re"])
def test_bfloat16_models_keep_only_their_crf_in_float32(task, ner_folder, tiny_re_dir):
    runner = pipeline(f"multimodal-{task}", model=str(ner_folder if task == "ner" else tiny_re_dir), dtype="bfloat16")
    dtypes = {name: parameter.dtype for name, parameter in runner.model.named_parameters()}
    assert {name for name, dtype in dtypes.items() if dtype != torch.bfloat16} == {
        name for name in dtypes if name.startswith("crf.")
    }
    assert all(dtypes[name] == torch.float32 for name in dtypes if name.startswith("crf."))
    assert (task == "ner") == any(name.startswith("crf.") for name in dtypes)


def _recorded_logits(runner) -> list[torch.Tensor]:
    """The logits of every model call `runner` makes from now on."""
    calls = []
    forward = runner.model.forward

    def recording_forward(**inputs):
        outputs = forward(**inputs)
        calls.append(outputs.logits)
        return outputs

    runner.model.forward = recording_forward
    return calls


# bfloat16 pipelines against float32, as tests/test_modeling_hvpnet.py compares the models: bfloat16 keeps 8
# significant bits, every matmul rounds by up to 2**-8 of its size, and 5% of the largest logit leaves room for a
# few such steps per layer.
BF16_RELATIVE_TOLERANCE = 0.05


def test_bfloat16_relations_agree_with_float32_and_are_scored_in_float32(tiny_re_dir, image_files):
    inputs = _re_inputs(image_files)
    logits, results = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        runner = pipeline("multimodal-re", model=str(tiny_re_dir), dtype=dtype)
        calls = _recorded_logits(runner)
        results[dtype] = runner(inputs, batch_size=len(inputs), top_k=len(RELATIONS))
        [logits[dtype]] = calls  # one batch
    assert logits[torch.bfloat16].dtype == torch.bfloat16
    scale = logits[torch.float32].abs().max().item()
    torch.testing.assert_close(
        logits[torch.bfloat16].float(), logits[torch.float32], atol=BF16_RELATIVE_TOLERANCE * scale, rtol=0
    )
    # The scores are the float32 softmax of the bfloat16 logits: a bfloat16 softmax would be off by up to 2**-9 of
    # each probability (5e-4 at 0.25), far beyond float32 rounding.
    probabilities = logits[torch.bfloat16].float().softmax(dim=-1)
    for result, row in zip(results[torch.bfloat16], probabilities, strict=True):
        assert {item["relation"]: item["score"] for item in result} == pytest.approx(
            {runner.model.config.id2label[label]: float(score) for label, score in enumerate(row)}, abs=1e-7
        )


def test_bfloat16_ner_tags_what_float32_tags(ner_folder, image_files):
    inputs = _ner_inputs(image_files)  # with a text read in several windows and one without words
    results = {
        dtype: pipeline("multimodal-ner", model=str(ner_folder), dtype=dtype)(inputs, batch_size=2)
        for dtype in (torch.float32, torch.bfloat16)
    }
    assert len(results[torch.bfloat16]) == len(inputs)
    for result, expected in zip(results[torch.bfloat16], results[torch.float32], strict=True):
        # The B-PER emission dominates by 30 logits in either dtype: every word is tagged, with probability 1.
        _assert_same_result(result, expected)


def test_ner_input_with_both_text_and_words_is_refused(ner_folder):
    ner = pipeline("multimodal-ner", model=str(ner_folder))
    with pytest.raises(ValueError, match="takes 'text' or 'words', not both"):
        ner({"text": "a b", "words": ["a", "b"]})
    with pytest.raises(ValueError, match="input 1: a multimodal-ner input takes 'text' or 'words', not both"):
        ner(["a b", {"text": "a b", "words": ["a", "b"]}])


class _EmptyDataset(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 0

    def __getitem__(self, index: int):
        raise IndexError(index)


@pytest.mark.parametrize("task", ["ner", "re"])
def test_no_inputs_give_no_results(task, ner_folder, tiny_re_dir):
    runner = pipeline(f"multimodal-{task}", model=str(ner_folder if task == "ner" else tiny_re_dir))
    assert runner([]) == []
    assert runner([], batch_size=4, num_workers=2) == []
    assert list(runner(_EmptyDataset())) == []
    assert list(runner(example for example in [])) == []


@pytest.mark.parametrize(
    "empty", [np.zeros((0, 5, 3), np.uint8), Image.new("RGB", (0, 0))], ids=["0x5 array", "0x0 PIL image"]
)
def test_images_without_pixels_are_named_or_masked(ner_folder, image_files, empty, caplog):
    ner = pipeline("multimodal-ner", model=str(ner_folder))
    inputs = [{"text": "Liverpool today"}, {"text": "Liverpool today", "image": image_files[0], "objects": [empty]}]
    with pytest.raises(ValueError, match=r"input 1: 'objects'\[0\] has no pixels"):
        ner(inputs)
    with pytest.raises(ValueError, match=r"input 0: 'image' has no pixels"):
        ner([{"text": "Liverpool", "image": empty}])
    masked = ner(inputs, missing_images="mask")
    assert masked[1] == ner({"text": "Liverpool today", "image": image_files[0]})
    assert "'objects'[0] has no pixels" in caplog.text


def test_a_model_folder_without_its_processor_is_named(tmp_path):
    model, _ = tiny_task_model("ner")
    model.save_pretrained(tmp_path)  # the processor is not saved
    message = (
        rf"{tmp_path} holds no HVPNeT processor \(missing processor_config.json, tokenizer_config.json\): save it "
        rf"with the model, processor.save_pretrained\('{tmp_path}'\)"
    )
    with pytest.raises(ValueError, match=message):
        pipeline("multimodal-ner", model=str(tmp_path))
    with pytest.raises(ValueError, match=message):
        pipeline(model=str(tmp_path), trust_remote_code=True)


@pytest.mark.parametrize("task", ["ner", "re"])
def test_pipelines_take_several_images_and_datasets_image_values(tmp_path, image_files, task):
    tiny_model_folder(tmp_path, task)
    runner = pipeline("multimodal-ner" if task == "ner" else "multimodal-re", model=str(tmp_path))
    example = {"words": ["Kevin", "Durant", "in", "Boston"]}
    if task == "re":
        example.update(head=(0, 2), tail=(3, 4))
    calls = []
    original_forward = runner.model.forward

    def recording_forward(**inputs):
        calls.append({name: value.clone() for name, value in inputs.items() if torch.is_tensor(value)})
        return original_forward(**inputs)

    runner.model.forward = recording_forward
    first, second, crop = image_files
    # A post of two pictures: the second takes the first crop slot, the crop the next one.
    runner({**example, "image": [first, Image.open(second)], "objects": [crop]})
    expected = runner.processor.image_processor.preprocess_example([first, second], [crop])
    assert calls[0]["image_mask"][0].tolist() == expected["image_mask"].tolist() == [True, True, True]
    torch.testing.assert_close(calls[0]["pixel_values"][0], expected["pixel_values"], rtol=0, atol=0)
    # An image embedded as datasets stores it (bytes and a path that need not exist here) is its file.
    value = {"bytes": open(first, "rb").read(), "path": "elsewhere/0.png"}
    assert runner({**example, "image": value}) == runner({**example, "image": first})
    torch.testing.assert_close(calls[-1]["pixel_values"], calls[-2]["pixel_values"], rtol=0, atol=0)


def test_pipeline_image_values_are_checked_by_slot(ner_folder, image_files):
    ner = pipeline("multimodal-ner", model=str(ner_folder))
    with pytest.raises(TypeError, match=r"'image'\[1\] must be a PIL image, .* got int"):
        ner({"text": "Liverpool", "image": [image_files[0], 3]})
    with pytest.raises(TypeError, match=r"'objects'\[0\] must be a datasets Image\(\) value .* got keys \['url'\]"):
        ner({"text": "Liverpool", "objects": [{"url": image_files[0]}]})
    for policy in ("mask", "error"):  # a URL is not a missing file: it is refused under either policy
        with pytest.raises(ValueError, match=r"'image' is a URL \(https://example.com/0.png\)"):
            ner({"text": "Liverpool", "image": "https://example.com/0.png"}, missing_images=policy)
