"""
Every supported text-encoder family (BERT, RoBERTa, XLM-R, CamemBERT, ELECTRA, ...) with the tokenizer families they
use (WordPiece, byte-level BPE, SentencePiece/Unigram): the configuration keeps the family's type, the model is the
family's own model when every image is masked, other types are refused by name, every word keeps one tag and the
relation markers never coincide with a special token. Tiny random models and tokenizers trained offline.
"""

import inspect
import json

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from modeling_utils import (
    IMAGE_SIZE,
    TINY_TEXT_CONFIGS,
    TOKENIZER_SENTENCES,
    TOKENIZERS,
    byte_level_bpe_tokenizer,
    tiny_config,
    tiny_family_task_model,
    tiny_text_config,
)
from torch import nn
from transformers import AutoModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from hvpnet_hf import HVPNetConfig, HVPNetForTokenClassification, HVPNetModel, HVPNetProcessor, modeling_hvpnet
from hvpnet_hf.configuration_hvpnet import TEXT_MODEL_TYPES
from hvpnet_hf.modeling_hvpnet import HVPNetSelfAttention
from hvpnet_hf.pipelines import MultimodalNerPipeline
from hvpnet_hf.processing_hvpnet import ENTITY_MARKERS, NAMED_SPECIAL_TOKENS, ner_word_positions

FAMILIES = sorted(TINY_TEXT_CONFIGS)
# Encoders whose attention is not BERT's: DeBERTa's disentangled attention, ModernBERT's rotary local/global layers,
# DistilBERT's own layer layout, ALBERT's shared layers, MPNet's relative position bias.
UNSUPPORTED = ["albert", "deberta", "deberta-v2", "distilbert", "modernbert", "mpnet"]
# A tweet with what tokenizers split in different ways: a mention, hashtags, a URL, an emoji, a word never seen.
TWEET = "RT @user : Kevin Durant enters Oracle Arena #NBA #Warriors https://t.co/xyz 😂 Zyqxwv".split()


def family_inputs(text_config, batch_size: int = 3, text_length: int = 9) -> dict:
    """Random text (ids above the special tokens) with padding in the last example, padded with the family's id."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, text_config.vocab_size, (batch_size, text_length), generator=generator)
    attention_mask = torch.ones(batch_size, text_length, dtype=torch.long)
    attention_mask[-1, -3:] = 0
    input_ids[attention_mask == 0] = text_config.pad_token_id
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def test_the_supported_types_are_the_ones_the_tests_cover():
    assert set(TEXT_MODEL_TYPES) == set(TINY_TEXT_CONFIGS)


def test_a_family_is_supported_by_its_type_alone():
    """Supporting a family takes its type in `TEXT_MODEL_TYPES` and no class: the only class of the model built on
    a family's modules is the prefix attention, on BERT's."""
    on_family_modules = {
        cls
        for _, cls in inspect.getmembers(modeling_hvpnet, inspect.isclass)
        if cls.__module__ == modeling_hvpnet.__name__
        and any(base.__module__.startswith("transformers.models.") for base in cls.__mro__)
    }
    assert on_family_modules == {HVPNetSelfAttention}


@pytest.mark.parametrize("model_type", FAMILIES)
def test_every_module_keeps_the_class_it_was_built_as(model_type, monkeypatch):
    """The prefix attention is put in place as a module of its own: no module of a built model has a class other
    than the one its constructor ran for."""
    built_as, module_init = {}, nn.Module.__init__

    def recording_init(module, *args, **kwargs):
        built_as[id(module)] = type(module)
        module_init(module, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "__init__", recording_init)
    model = HVPNetModel(tiny_config(text_config=tiny_text_config(model_type)))
    monkeypatch.undo()
    modules = dict(model.named_modules())
    assert all(id(module) in built_as for module in modules.values())
    assert {name: type(module) for name, module in modules.items()} == {
        name: built_as[id(module)] for name, module in modules.items()
    }


@pytest.mark.parametrize("model_type", FAMILIES)
def test_text_config_keeps_its_own_type_through_saving(model_type, tmp_path):
    family_config = CONFIG_MAPPING[model_type]
    from_dict = tiny_config(text_config=tiny_text_config(model_type))
    from_object = tiny_config(text_config=family_config(**TINY_TEXT_CONFIGS[model_type]))
    assert type(from_dict.text_config) is family_config and type(from_object.text_config) is family_config
    from_dict.save_pretrained(tmp_path)
    reloaded = HVPNetConfig.from_pretrained(tmp_path)
    assert type(reloaded.text_config) is family_config
    assert reloaded.text_config.to_dict() == from_dict.text_config.to_dict()
    assert HVPNetConfig.from_dict(from_dict.to_dict()).text_config.to_dict() == from_dict.text_config.to_dict()


@pytest.mark.parametrize("model_type", FAMILIES)
def test_with_every_image_masked_the_model_is_the_family_model_and_images_change_it(model_type):
    config = tiny_config(text_config=tiny_text_config(model_type))
    model = HVPNetModel(config).eval()
    reference = AutoModel.from_config(config.text_config).eval()
    reference.load_state_dict(model.text_model.state_dict())  # strict: the family's own module names and weights
    assert type(model.text_model) is type(reference)
    layers, family_layers = model.text_model.encoder.layer, reference.encoder.layer
    assert [type(layer) for layer in layers] == [type(layer) for layer in family_layers]
    assert all(type(layer.attention.self) is HVPNetSelfAttention for layer in layers)
    assert not any(parameter.is_meta for parameter in model.parameters())  # every projection taken over

    inputs = family_inputs(config.text_config)
    images = torch.randn(3, 1 + config.num_object_images, 3, IMAGE_SIZE, IMAGE_SIZE)
    absent = torch.zeros(3, 1 + config.num_object_images, dtype=torch.bool)
    with torch.no_grad():
        expected = reference(**inputs)
        masked = model(**inputs, pixel_values=images, image_mask=absent)
        without_images = model(**inputs)
        with_images = model(**inputs, pixel_values=images, image_mask=~absent)
    real = inputs["attention_mask"].bool()
    # 1e-5: the same weights and operations; only the prefix columns (masked out) are added to the attention.
    for output in (masked, without_images):
        torch.testing.assert_close(output.last_hidden_state[real], expected.last_hidden_state[real], atol=1e-5, rtol=0)
        if getattr(expected, "pooler_output", None) is not None:
            torch.testing.assert_close(output.pooler_output, expected.pooler_output, atol=1e-5, rtol=0)
    # Random weights give prefix keys of the scale of text keys: present images move the states well beyond noise.
    assert (with_images.last_hidden_state[real] - expected.last_hidden_state[real]).abs().max() > 1e-2


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_hidden_states_and_attention_weights_are_recorded(model_type, attn_implementation):
    """As for the family's own model: L + 1 hidden states and, under eager, one weight tensor per layer over the
    prefix and text keys; sdpa computes no weights and gives an empty tuple, as BERT does."""
    config = tiny_config(text_config=tiny_text_config(model_type))
    model = HVPNetModel(config).eval()
    model.set_attn_implementation(attn_implementation)
    inputs = family_inputs(config.text_config)
    images = torch.randn(3, 1 + config.num_object_images, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        output = model(**inputs, pixel_values=images, output_attentions=True, output_hidden_states=True)
    layers, heads = config.text_config.num_hidden_layers, config.text_config.num_attention_heads
    assert len(output.hidden_states) == layers + 1
    weights_shape = (3, heads, 9, config.prefix_length + 9)
    expected = [weights_shape] * layers if attn_implementation == "eager" else []
    assert [tuple(weights.shape) for weights in output.attentions] == expected


@pytest.mark.parametrize("model_type", ["roberta", "xlm-roberta", "camembert", "electra"])
def test_builder_reads_the_family_from_the_checkpoint_and_loads_its_weights(model_type, tmp_path):
    text_config = HVPNetConfig(text_config=tiny_text_config(model_type)).text_config
    AutoModel.from_config(text_config).save_pretrained(tmp_path)
    saved = AutoModel.from_pretrained(tmp_path).state_dict()
    model = HVPNetForTokenClassification.from_text_vision_pretrained(
        str(tmp_path), vision_backbone="test_resnet", num_labels=3
    )
    assert type(model.config.text_config) is type(text_config)
    loaded = model.hvpnet.text_model.state_dict()
    for name, weight in loaded.items():
        torch.testing.assert_close(weight, saved[name], atol=0, rtol=0)


@pytest.mark.parametrize("model_type", UNSUPPORTED)
def test_other_attention_layouts_are_refused_by_name(model_type, tmp_path):
    message = f"model_type '{model_type}'.*Supported text model types: bert, camembert"
    with pytest.raises(StrictDataclassError, match=message):
        HVPNetConfig(text_config=CONFIG_MAPPING[model_type]())
    with pytest.raises(StrictDataclassError, match=message):
        HVPNetConfig(text_config={"model_type": model_type})
    CONFIG_MAPPING[model_type]().save_pretrained(tmp_path)
    with pytest.raises(StrictDataclassError, match=message):
        HVPNetForTokenClassification.from_text_vision_pretrained(str(tmp_path), vision_backbone="test_resnet")


@pytest.mark.parametrize("family", sorted(TOKENIZERS))
def test_every_word_of_a_tweet_has_one_first_sub_word(family):
    processor = HVPNetProcessor(TOKENIZERS[family](), max_length=128)
    encoded = processor.encode_ner([TWEET], word_labels=[list(range(len(TWEET)))])
    starts, word_ids = encoded["word_start_mask"][0], encoded["word_ids"][0]
    assert sum(starts) == len(TWEET)
    assert [word for word, start in zip(word_ids, starts, strict=True) if start] == list(range(len(TWEET)))
    assert [tag for tag in encoded["labels"][0] if tag != -100] == list(range(len(TWEET)))
    assert ("token_type_ids" in encoded) == (family == "wordpiece")


@pytest.mark.parametrize("family", sorted(TOKENIZERS))
def test_windows_of_a_long_tweet_give_every_word_one_tag(family):
    processor = HVPNetProcessor(TOKENIZERS[family](), max_length=128)
    tokenizer = processor.tokenizer
    words = TWEET + TOKENIZER_SENTENCES[1].split()
    windows = processor.encode_ner([words], max_length=10, return_overflowing_tokens=True)
    assert len(windows["input_ids"]) > 2
    framing = [tokenizer.cls_token_id, tokenizer.sep_token_id]
    for row in windows["input_ids"]:
        assert len(row) <= 10 and [row[0], row[-1]] == framing
    # Merging the windows must read word i at a first sub-word of word i.
    positions = ner_word_positions(windows["word_ids"], len(words), windows["word_start_mask"])
    assert [windows["word_ids"][row][token] for row, token in positions] == list(range(len(words)))


def test_byte_level_bpe_without_the_prefix_space_convention_is_refused():
    with pytest.raises(ValueError, match="add_prefix_space=True"):
        HVPNetProcessor(byte_level_bpe_tokenizer(add_prefix_space=False))


@pytest.mark.parametrize(
    ("family", "markers"),
    [
        ("wordpiece", ENTITY_MARKERS),  # the original code's markers, for parity with its BERT checkpoints
        ("byte-level-bpe", ["<e1>", "</e1>", "<e2>", "</e2>"]),  # `<s>` and `</s>` are RoBERTa's BOS and EOS
        ("unigram", ["<e1>", "</e1>", "<e2>", "</e2>"]),
    ],
)
def test_relation_markers_are_tokens_of_their_own_and_saved(family, markers, tmp_path):
    processor = HVPNetProcessor(TOKENIZERS[family](), task="re", max_length=64)
    tokenizer = processor.tokenizer
    assert processor.entity_markers == markers
    special_ids = {getattr(tokenizer, f"{name}_id") for name in NAMED_SPECIAL_TOKENS} - {None}
    marker_ids = tokenizer.convert_tokens_to_ids(markers)
    assert len(set(marker_ids)) == 4 and not special_ids.intersection(marker_ids)
    assert [processor.head_start_token_id, processor.tail_start_token_id] == [marker_ids[0], marker_ids[2]]

    words = ["Alice", "<s>", "met", "Bob", "in", "Paris"]  # a word spelling a marker is read as unknown
    encoded = processor.encode_re([words], [{"start": 0, "end": 1}], [{"start": 3, "end": 4}])
    input_ids = encoded["input_ids"][0]
    assert [input_ids[0], input_ids[-1]] == [tokenizer.cls_token_id, tokenizer.sep_token_id]
    assert [input_ids.count(marker) for marker in marker_ids] == [1, 1, 1, 1]
    assert input_ids[1] == marker_ids[0]  # the head starts the sentence, right after the classifier token
    assert ("token_type_ids" in encoded) == (family == "wordpiece")

    processor.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "processor_config.json").read_text())["entity_markers"] == markers
    reloaded = HVPNetProcessor.from_pretrained(tmp_path)
    assert reloaded.entity_markers == markers
    assert reloaded.encode_re([words], [{"start": 0, "end": 1}], [{"start": 3, "end": 4}]) == encoded


def test_markers_that_are_special_tokens_are_refused():
    with pytest.raises(ValueError, match="not special tokens of the tokenizer"):
        HVPNetProcessor(byte_level_bpe_tokenizer(), task="re", entity_markers=ENTITY_MARKERS)


@pytest.mark.parametrize(("model_type", "family"), [("roberta", "byte-level-bpe"), ("xlm-roberta", "unigram")])
def test_models_without_token_type_ids_run_relations_and_the_ner_pipeline(model_type, family):
    model, processor = tiny_family_task_model("re", model_type, TOKENIZERS[family]())
    assert processor.model_input_names[:2] == ["input_ids", "attention_mask"]
    assert "token_type_ids" not in processor.model_input_names
    inputs = processor(None, ["Alice", "met", "Bob"], head={"start": 0, "end": 1}, tail={"start": 2, "end": 3})
    assert "token_type_ids" not in inputs
    with torch.no_grad():
        assert model.eval()(**inputs).logits.shape == (1, len(model.config.id2label))
    assert model.config.head_start_token_id != processor.tokenizer.bos_token_id

    model, processor = tiny_family_task_model("ner", model_type, TOKENIZERS[family]())
    ner = MultimodalNerPipeline(model=model, processor=processor)
    text = " ".join(TWEET)
    for entity in ner(text, max_length=8):
        assert entity["word"] == " ".join(TWEET[entity["word_start"] : entity["word_end"]])
        assert text[entity["start"] : entity["end"]] == entity["word"]


@pytest.mark.parametrize(
    ("model_type", "longest"), [("bert", 64), ("electra", 64), ("roberta", 62), ("xlm-roberta", 62)]
)
def test_the_longest_text_leaves_out_the_positions_roberta_skips(model_type, longest):
    model = HVPNetModel(tiny_config(text_config=tiny_text_config(model_type))).eval()
    assert model.max_text_length == longest
    inputs = family_inputs(model.config.text_config, text_length=longest)
    with torch.no_grad():
        assert model(**inputs).last_hidden_state.shape[1] == longest
    if longest < model.config.text_config.max_position_embeddings:
        with pytest.raises((IndexError, RuntimeError), match="out of"):  # one position past the table
            model(**family_inputs(model.config.text_config, text_length=longest + 1))


def test_the_pipeline_refuses_windows_longer_than_roberta_positions():
    model, processor = tiny_family_task_model("ner", "roberta", byte_level_bpe_tokenizer())
    ner = MultimodalNerPipeline(model=model, processor=processor)
    with pytest.raises(ValueError, match=r"max_position_embeddings \(64 less the 2 its embeddings skip: 62\), got 63"):
        ner("Alice met Bob", max_length=63)
    assert isinstance(ner("Alice met Bob", max_length=62), list)
