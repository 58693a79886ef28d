"""ONNX export of the task models: onnxruntime against PyTorch at batch sizes and text lengths other than the traced
ones, with absent images, and the NER CRF decode of onnxruntime emissions against the model's own tags."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import hvpnet_hf.onnx_export
from hvpnet_hf import HVPNetConfig, HVPNetProcessor
from hvpnet_hf.onnx_export import METADATA_FILE, ONNX_FILE, HVPNetOnnxModel, export_onnx, load_task_model, main

# Three examples (the export traced two), one of a single word.
WORDS = [
    ["RT", "@KevinDurant", ":", "Golden", "State", "Warriors", "win", "in", "Oakland", "tonight"],
    ["Paris"],
    ["New", "York", "is", "busy", "today"],
]
SPANS = [({"start": 3, "end": 6}, {"start": 8, "end": 9}), ({"start": 0, "end": 1}, {"start": 0, "end": 1})]
SPANS.append(({"start": 0, "end": 2}, {"start": 4, "end": 5}))
# The task's parity target. Both sides compute in float32; what differs is kernel choice and summation order.
LOGIT_TOLERANCE = 1e-4


def encoded_inputs(folder: str, task: str, count: int = len(WORDS)) -> dict[str, torch.Tensor]:
    """The processor's encoding of the first `count` examples, with random images and some of them absent."""
    processor = HVPNetProcessor.from_pretrained(folder)
    if task == "ner":
        encoded = processor(text=WORDS[:count])
    else:
        heads, tails = zip(*SPANS[:count], strict=True)
        encoded = processor(text=WORDS[:count], head=list(heads), tail=list(tails))
    generator = torch.Generator().manual_seed(count)
    encoded["pixel_values"] = torch.randn(encoded["pixel_values"].shape, generator=generator)
    encoded["image_mask"] = torch.ones_like(encoded["image_mask"])
    encoded["image_mask"][0, 1] = False
    encoded["image_mask"][-1] = False
    return dict(encoded)


def model_outputs(folder: str, inputs: dict[str, torch.Tensor]):
    model = load_task_model(folder)
    names = ["input_ids", "attention_mask", "token_type_ids", "pixel_values", "image_mask", "word_start_mask"]
    with torch.no_grad():
        return model(**{name: inputs[name] for name in names if name in inputs})


def ner_tags(folder: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The tags the torch NER model decodes for `inputs`."""
    model = load_task_model(folder)
    return model.decode(model_outputs(folder, inputs).logits, inputs["word_start_mask"])


@pytest.fixture(scope="module")
def ner_onnx(tiny_ner_dir, tmp_path_factory) -> str:
    """The tiny NER model exported through the command."""
    folder = tmp_path_factory.mktemp("ner_onnx")
    main(["--model", tiny_ner_dir, "--output", str(folder)])
    return str(folder)


@pytest.fixture(scope="module")
def re_export(tiny_re_dir, tmp_path_factory) -> tuple[str, torch.onnx.ONNXProgram]:
    """The tiny RE model exported by the function, with the program it returns."""
    folder = tmp_path_factory.mktemp("re_onnx")
    return str(folder), export_onnx(tiny_re_dir, folder)


def test_the_command_writes_graph_metadata_and_processor(ner_onnx, tiny_ner_dir):
    metadata = json.loads((Path(ner_onnx) / METADATA_FILE).read_text())
    model = load_task_model(tiny_ner_dir)
    assert metadata["task"] == "ner"
    assert torch.equal(torch.tensor(metadata["crf"]["transitions"]), model.crf.transitions.detach())
    assert (
        HVPNetProcessor.from_pretrained(ner_onnx).tokenizer.vocab
        == HVPNetProcessor.from_pretrained(tiny_ner_dir).tokenizer.vocab
    )
    assert (Path(ner_onnx) / ONNX_FILE).stat().st_size > 0


@pytest.mark.parametrize("count", [len(WORDS), 1])
def test_onnxruntime_ner_emissions_and_crf_tags_match_pytorch(ner_onnx, tiny_ner_dir, count):
    inputs = encoded_inputs(tiny_ner_dir, "ner", count)
    expected = model_outputs(tiny_ner_dir, inputs)
    onnx_model = HVPNetOnnxModel(ner_onnx)
    emissions = onnx_model(inputs)
    assert emissions.shape == tuple(expected.logits.shape)
    np.testing.assert_allclose(emissions, expected.logits.numpy(), atol=LOGIT_TOLERANCE, rtol=0)
    assert torch.equal(onnx_model.decode(emissions, inputs["word_start_mask"]), ner_tags(tiny_ner_dir, inputs))


def test_crf_decode_matches_the_model_on_its_own_emissions(ner_onnx, tiny_ner_dir):
    """Decoding PyTorch's emissions must give the model's tags exactly, also for a row without any word."""
    inputs = encoded_inputs(tiny_ner_dir, "ner")
    inputs["word_start_mask"][1] = False
    expected = model_outputs(tiny_ner_dir, inputs)
    tags = HVPNetOnnxModel(ner_onnx).decode(expected.logits.numpy(), inputs["word_start_mask"])
    assert (tags[1] == -100).all()
    assert torch.equal(tags, ner_tags(tiny_ner_dir, inputs))
    with pytest.raises(ValueError, match="decoding NER emissions needs the inputs' word_start_mask"):
        HVPNetOnnxModel(ner_onnx).decode(expected.logits.numpy())


@pytest.mark.parametrize("count", [len(WORDS), 1])
def test_onnxruntime_relation_logits_match_pytorch(re_export, tiny_re_dir, count):
    folder, _ = re_export
    inputs = encoded_inputs(tiny_re_dir, "re", count)
    expected = model_outputs(tiny_re_dir, inputs).logits.numpy()
    logits = HVPNetOnnxModel(folder)(inputs)
    assert logits.shape == expected.shape
    np.testing.assert_allclose(logits, expected, atol=LOGIT_TOLERANCE, rtol=0)


def test_relation_decode_ranks_as_the_model_does(re_export, tiny_re_dir):
    folder, _ = re_export
    inputs = encoded_inputs(tiny_re_dir, "re")
    onnx_model = HVPNetOnnxModel(folder)
    ranked = onnx_model.decode(onnx_model(inputs), top_k=2)
    expected = load_task_model(tiny_re_dir).decode(model_outputs(tiny_re_dir, inputs).logits, top_k=2)
    assert [[entry["relation"] for entry in row] for row in ranked] == [
        [entry["relation"] for entry in row] for row in expected
    ]
    # Softmax is 1/2-Lipschitz in the max norm: logits within LOGIT_TOLERANCE give probabilities within half of it.
    scores = [entry["score"] for row in expected for entry in row]
    assert [entry["score"] for row in ranked for entry in row] == pytest.approx(scores, abs=LOGIT_TOLERANCE / 2)


def test_the_exported_program_gives_the_relation_logits_at_other_sizes(re_export, tiny_re_dir):
    _, program = re_export
    inputs = encoded_inputs(tiny_re_dir, "re")
    expected = model_outputs(tiny_re_dir, inputs).logits
    names = ["input_ids", "attention_mask", "token_type_ids", "pixel_values", "image_mask"]
    with torch.no_grad():
        logits = program.exported_program.module()(**{name: inputs[name] for name in names})
    # The graph after decomposition into core ATen operators, run by PyTorch: float32 rounding only.
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-4)


def test_relation_rows_without_markers_are_refused(re_export, tiny_re_dir):
    folder, _ = re_export
    inputs = encoded_inputs(tiny_re_dir, "re")
    onnx_model = HVPNetOnnxModel(folder)
    inputs["input_ids"][2][inputs["input_ids"][2] == onnx_model.metadata["tail_start_token_id"]] = 100
    with pytest.raises(ValueError, match=r"rows \[2\] lack the entity marker tail_start_token_id"):
        onnx_model(inputs)


def test_a_folder_without_a_task_model_is_refused(tmp_path):
    HVPNetConfig().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="expected an HVPNeT NER or RE model"):
        load_task_model(tmp_path)


def test_an_output_that_is_a_file_is_refused_before_exporting(tmp_path, monkeypatch):
    monkeypatch.setattr(hvpnet_hf.onnx_export, "export_onnx", lambda *args: pytest.fail("exported"))
    taken = tmp_path / "taken"
    taken.write_text("a file")
    with pytest.raises(NotADirectoryError, match="--output .*taken: .*taken is a file"):
        main(["--model", "unused", "--output", str(taken)])
