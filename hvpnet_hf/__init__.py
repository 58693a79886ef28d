"""HVPNeT for multimodal NER and relation extraction, native to Hugging Face transformers."""

from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoModelForTokenClassification

from .configuration_hvpnet import HVPNetConfig
from .modeling_hvpnet import (
    HVPNetForSequenceClassification,
    HVPNetForTokenClassification,
    HVPNetModel,
    HVPNetPreTrainedModel,
)

AutoConfig.register(HVPNetConfig.model_type, HVPNetConfig, exist_ok=True)
AutoModel.register(HVPNetConfig, HVPNetModel, exist_ok=True)
AutoModelForTokenClassification.register(HVPNetConfig, HVPNetForTokenClassification, exist_ok=True)
AutoModelForSequenceClassification.register(HVPNetConfig, HVPNetForSequenceClassification, exist_ok=True)
# Saved folders carry the configuration and modeling files, so they load with trust_remote_code=True where this
# package is not installed.
HVPNetConfig.register_for_auto_class()
HVPNetModel.register_for_auto_class("AutoModel")
HVPNetForTokenClassification.register_for_auto_class("AutoModelForTokenClassification")
HVPNetForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

__all__ = [
    "HVPNetConfig",
    "HVPNetForSequenceClassification",
    "HVPNetForTokenClassification",
    "HVPNetModel",
    "HVPNetPreTrainedModel",
]
