"""HVPNeT configuration: validation of its settings and the round trip through config.json."""

import pytest
from modeling_utils import tiny_config
from transformers import AutoConfig, BertConfig

from hvpnet_hf import HVPNetConfig

HEAD = 3


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"prefix_mode": "diagonal"}, "prefix_mode"),
        ({"relation_pooling": "mean"}, "relation_pooling"),
        ({"use_global_image": False, "num_object_images": 0}, "no image"),
    ],
)
def test_bad_config_raises(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_vision_chunk_size_must_be_positive_or_none():
    with pytest.raises(ValueError, match="vision_chunk_size"):
        tiny_config(vision_chunk_size=0)
    assert tiny_config(vision_chunk_size=None).vision_chunk_size is None


def test_config_round_trip(tmp_path):
    config = tiny_config(prefix_mode="one_to_three", prefix_grid=3, head_start_token_id=HEAD, freeze_vision=False)
    config.save_pretrained(tmp_path)
    reloaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(reloaded, HVPNetConfig)
    assert isinstance(reloaded.text_config, BertConfig)
    without_origin = {key: value for key, value in reloaded.to_dict().items() if key != "_name_or_path"}
    assert without_origin == {key: value for key, value in config.to_dict().items() if key != "_name_or_path"}
    assert HVPNetConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()
