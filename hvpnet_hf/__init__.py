"""HVPNeT for multimodal NER and relation extraction, native to Hugging Face transformers."""

from .configuration_hvpnet import HVPNetConfig

__all__ = ["HVPNetConfig"]
