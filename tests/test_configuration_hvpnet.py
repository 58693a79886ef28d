"""HVPNeT configuration: validation of its settings and the round trip through config.json."""

import dataclasses

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from modeling_utils import tiny_config, tiny_inputs
from transformers import AutoConfig, BertConfig

from hvpnet_hf import HVPNetConfig, HVPNetForSequenceClassification, HVPNetForTokenClassification, HVPNetModel

HEAD = 3
TAIL = 4
RELATIONS = ["None", "/per/per/peer", "/org/org/subsidiary"]
# The config.json that the previous `HVPNetConfig` (a hand-written `__init__`) saved for a tiny relation model.
PREVIOUS_CONFIG_JSON = """{
  "architectures": ["HVPNetForSequenceClassification"],
  "auto_map": {"AutoConfig": "configuration_hvpnet.HVPNetConfig", "AutoModel": "modeling_hvpnet.HVPNetModel",
    "AutoModelForSequenceClassification": "modeling_hvpnet.HVPNetForSequenceClassification"},
  "classifier_dropout": null,
  "custom_pipelines": {"hvpnet-re": {"impl": "pipelines.MultimodalRePipeline",
    "pt": ["AutoModelForSequenceClassification"], "type": "multimodal"}},
  "dtype": "float32", "freeze_vision": true, "head_start_token_id": 3,
  "id2label": {"0": "None", "1": "/per/per/peer", "2": "/org/org/subsidiary"},
  "label2id": {"/org/org/subsidiary": 2, "/per/per/peer": 1, "None": 0},
  "model_type": "hvpnet", "num_object_images": 2, "prefix_grid": 2, "prefix_mode": "flat",
  "relation_pooling": "entity_markers", "tail_start_token_id": 4,
  "text_config": {"_name_or_path": "", "add_cross_attention": false, "architectures": null,
    "attention_probs_dropout_prob": 0.0, "bos_token_id": null, "chunk_size_feed_forward": 0,
    "classifier_dropout": null, "dtype": null, "eos_token_id": null, "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
    "hidden_size": 32, "id2label": {"0": "LABEL_0", "1": "LABEL_1"}, "initializer_range": 0.02,
    "intermediate_size": 37, "is_decoder": false, "is_encoder_decoder": false, "label2id": {"LABEL_0": 0, "LABEL_1": 1},
    "layer_norm_eps": 1e-12, "max_position_embeddings": 64, "model_type": "bert", "num_attention_heads": 4,
    "num_hidden_layers": 4, "output_attentions": false, "output_hidden_states": false, "pad_token_id": 0,
    "problem_type": null, "return_dict": true, "tie_word_embeddings": true, "type_vocab_size": 2, "use_cache": true,
    "vocab_size": 99},
  "transformers_version": "5.25.0", "use_global_image": true, "use_visual_prefix": true,
  "vision_backbone": "test_resnet", "vision_chunk_size": 4, "vision_model_args": {"drop_rate": 0.0},
  "vision_out_indices": [1, 2, 3, 4], "vision_pretrained": false
}"""


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"prefix_mode": "diagonal"}, "prefix_mode"),
        ({"relation_pooling": "mean"}, "relation_pooling"),
        ({"use_global_image": False, "num_object_images": 0}, "no image"),
        ({"num_object_images": -1}, "num_object_images must be >= 0"),
        ({"prefix_grid": 0}, "prefix_grid must be >= 1"),
        ({"vision_chunk_size": 0}, "vision_chunk_size must be >= 1 or None"),
        ({"freeze_vision": "no"}, "freeze_vision"),
        ({"vision_out_indices": (1, 2)}, "vision_out_indices"),
    ],
)
def test_bad_config_raises(overrides, message):
    with pytest.raises(StrictDataclassError, match=message):
        tiny_config(**overrides)


def test_vision_chunk_size_none_runs_all_images_at_once():
    assert tiny_config(vision_chunk_size=None).vision_chunk_size is None


def test_saving_refuses_settings_changed_into_a_bad_state(tmp_path):
    config = tiny_config()
    config.prefix_grid = 0
    with pytest.raises(StrictDataclassError, match="prefix_grid must be >= 1"):
        config.save_pretrained(tmp_path)


def test_config_round_trip(tmp_path):
    config = tiny_config(prefix_mode="one_to_three", prefix_grid=3, head_start_token_id=HEAD, freeze_vision=False)
    config.save_pretrained(tmp_path)
    reloaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(reloaded, HVPNetConfig)
    assert isinstance(reloaded.text_config, BertConfig)
    without_origin = {key: value for key, value in reloaded.to_dict().items() if key != "_name_or_path"}
    assert without_origin == {key: value for key, value in config.to_dict().items() if key != "_name_or_path"}
    assert HVPNetConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()


def test_config_saved_by_the_previous_version_gives_the_same_model(tmp_path):
    (tmp_path / "config.json").write_text(PREVIOUS_CONFIG_JSON)
    loaded = HVPNetConfig.from_pretrained(tmp_path)
    config = tiny_config(
        prefix_mode="flat",
        head_start_token_id=HEAD,
        tail_start_token_id=TAIL,
        num_labels=len(RELATIONS),
        id2label=dict(enumerate(RELATIONS)),
        label2id={label: index for index, label in enumerate(RELATIONS)},
        vision_model_args={"drop_rate": 0.0},
        vision_out_indices=[1, 2, 3, 4],
    )
    assert isinstance(loaded.text_config, BertConfig)
    for setting in dataclasses.fields(HVPNetConfig):
        if setting.name not in ("text_config", "architectures", "dtype", "transformers_version"):
            assert getattr(loaded, setting.name) == getattr(config, setting.name), setting.name
    assert loaded.text_config.to_diff_dict() == config.text_config.to_diff_dict()
    models = []
    for source in (loaded, config):
        torch.manual_seed(0)
        models.append(HVPNetForSequenceClassification(source).eval())
    inputs = tiny_inputs()
    inputs["input_ids"][:, 1], inputs["input_ids"][:, 3] = HEAD, TAIL
    with torch.no_grad():
        logits = [model(**inputs).logits for model in models]
    # Same settings and seed: the same weights, so the same computation, bit for bit.
    torch.testing.assert_close(logits[0], logits[1], atol=0, rtol=0)


@pytest.mark.parametrize("model_class", [HVPNetModel, HVPNetForTokenClassification, HVPNetForSequenceClassification])
def test_building_a_model_leaves_its_config_unchanged(model_class):
    config = tiny_config(head_start_token_id=HEAD, tail_start_token_id=TAIL)
    settings = config.to_dict()
    model_class(config)
    assert config.to_dict() == settings
