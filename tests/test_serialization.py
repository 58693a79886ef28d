"""Saving, reloading (also as remote code where hvpnet_hf is not importable) and building from pretrained parts."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from modeling_utils import TINY_TEXT, tiny_config, tiny_inputs
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BertConfig,
    BertModel,
    BertTokenizerFast,
)

from hvpnet_hf import (
    HVPNetConfig,
    HVPNetForSequenceClassification,
    HVPNetForTokenClassification,
    HVPNetModel,
    HVPNetProcessor,
)

HEAD, TAIL = 3, 4


def example_inputs(model_class) -> dict:
    inputs = tiny_inputs()
    if model_class is HVPNetForSequenceClassification:
        inputs["input_ids"][:, 1] = HEAD
        inputs["input_ids"][:, 4] = TAIL
    if model_class is HVPNetForTokenClassification:
        inputs["word_start_mask"] = inputs["attention_mask"].bool()
    return inputs


def main_output(model_class, output) -> torch.Tensor:
    return output.last_hidden_state if model_class is HVPNetModel else output.logits


CLASSES = [
    (HVPNetModel, AutoModel),
    (HVPNetForTokenClassification, AutoModelForTokenClassification),
    (HVPNetForSequenceClassification, AutoModelForSequenceClassification),
]


def test_config_round_trip(tmp_path):
    config = tiny_config(prefix_mode="one_to_three", prefix_grid=3, head_start_token_id=HEAD, freeze_vision=False)
    config.save_pretrained(tmp_path)
    reloaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(reloaded, HVPNetConfig)
    assert isinstance(reloaded.text_config, BertConfig)
    without_origin = {key: value for key, value in reloaded.to_dict().items() if key != "_name_or_path"}
    assert without_origin == {key: value for key, value in config.to_dict().items() if key != "_name_or_path"}
    assert HVPNetConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()


def saved_model(model_class, folder) -> tuple[dict, torch.Tensor]:
    """Save a tiny random model to `folder`; return example inputs and its output on them."""
    torch.manual_seed(0)
    model = model_class(tiny_config(head_start_token_id=HEAD, tail_start_token_id=TAIL)).eval()
    inputs = example_inputs(model_class)
    with torch.no_grad():
        expected = main_output(model_class, model(**inputs))
    model.save_pretrained(folder)
    return inputs, expected


@pytest.mark.parametrize(("model_class", "auto_class"), CLASSES)
def test_save_and_reload_gives_the_same_outputs(tmp_path, model_class, auto_class):
    inputs, expected = saved_model(model_class, tmp_path)
    for loader in (model_class, auto_class):
        reloaded = loader.from_pretrained(tmp_path).eval()
        assert type(reloaded) is model_class
        with torch.no_grad():
            torch.testing.assert_close(main_output(model_class, reloaded(**inputs)), expected, atol=0, rtol=0)


@pytest.mark.parametrize(("model_class", "auto_class"), CLASSES)
def test_remote_code_loads_where_the_package_cannot_be_imported(tmp_path, model_class, auto_class):
    inputs, expected = saved_model(model_class, tmp_path / "model")
    torch.save({"inputs": inputs, "expected": expected}, tmp_path / "case.pt")
    attribute = "last_hidden_state" if model_class is HVPNetModel else "logits"
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["hvpnet_hf"] = None  # any import of the package now fails
        import torch
        import transformers
        case = torch.load({str(tmp_path / "case.pt")!r})
        model = transformers.{auto_class.__name__}.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True)
        assert "hvpnet_hf" not in type(model).__module__, type(model).__module__
        with torch.no_grad():
            output = model.eval()(**case["inputs"]).{attribute}
        torch.testing.assert_close(output, case["expected"], atol=1e-6, rtol=0)
        print("remote-code load ok", type(model).__name__)
        """
    )
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"remote-code load ok {model_class.__name__}" in result.stdout


@pytest.fixture
def tiny_bert_folder(tmp_path):
    """A tiny pretrained-looking BERT: weights, config and a WordPiece vocabulary."""
    folder = tmp_path / "tiny-bert"
    torch.manual_seed(1)
    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [
        f"word{i}" for i in range(TINY_TEXT["vocab_size"] - 5)
    ]
    BertModel(BertConfig(**TINY_TEXT)).save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(vocabulary) + "\n")
    return folder


def test_builder_loads_the_pretrained_text_encoder(tiny_bert_folder):
    model = HVPNetForTokenClassification.from_text_vision_pretrained(
        str(tiny_bert_folder), vision_backbone="test_resnet", num_labels=3, num_object_images=2
    )
    pretrained = BertModel.from_pretrained(tiny_bert_folder, add_pooling_layer=False).state_dict()
    loaded = model.hvpnet.text_model.state_dict()
    assert loaded.keys() == pretrained.keys()
    for name, weight in pretrained.items():
        torch.testing.assert_close(loaded[name], weight, atol=0, rtol=0)
    assert model.config.vision_backbone == "test_resnet"
    assert model.config.num_labels == 3


def test_builder_resizes_embeddings_and_reads_markers_from_the_processor(tiny_bert_folder):
    processor = HVPNetProcessor(BertTokenizerFast.from_pretrained(tiny_bert_folder), task="re")
    tokenizer = processor.tokenizer
    model = HVPNetForSequenceClassification.from_text_vision_pretrained(
        str(tiny_bert_folder), vision_backbone="test_resnet", processor=processor, num_labels=4
    ).eval()
    assert model.get_input_embeddings().num_embeddings == len(tokenizer) == TINY_TEXT["vocab_size"] + 4
    assert model.config.text_config.vocab_size == len(tokenizer)
    assert model.config.head_start_token_id == tokenizer.convert_tokens_to_ids("<s>")
    assert model.config.tail_start_token_id == tokenizer.convert_tokens_to_ids("<o>")
    encoded = tokenizer(["word1 <s> word2 </s> word3 <o> word4 </o>"], return_tensors="pt")
    with torch.no_grad():
        assert model(**encoded).logits.shape == (1, 4)
