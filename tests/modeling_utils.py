"""Tiny random HVPNeT configurations and inputs shared by the model tests."""

import torch

from hvpnet_hf import HVPNetConfig

TINY_TEXT = {
    "hidden_size": 32,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 37,
    "vocab_size": 99,
    "max_position_embeddings": 64,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}
IMAGE_SIZE = 64


def tiny_config(**overrides) -> HVPNetConfig:
    """A 4-layer BERT of width 32 with timm's 4-stage `test_resnet` backbone (no weights downloaded)."""
    settings = {
        "text_config": dict(TINY_TEXT),
        "vision_backbone": "test_resnet",
        "num_object_images": 2,
        "num_labels": 5,
    }
    settings.update(overrides)
    return HVPNetConfig(**settings)


def tiny_inputs(batch_size: int = 3, text_length: int = 9, num_objects: int = 2, seed: int = 0) -> dict:
    """Random text with padding in the last example, a global image and object crops per example."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, TINY_TEXT["vocab_size"], (batch_size, text_length), generator=generator)
    attention_mask = torch.ones(batch_size, text_length, dtype=torch.long)
    attention_mask[-1, text_length - 3 :] = 0
    input_ids[attention_mask == 0] = 0
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": torch.randn(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator),
        "object_pixel_values": torch.randn(batch_size, num_objects, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator),
    }
