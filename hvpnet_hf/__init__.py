"""HVPNeT for multimodal NER and relation extraction, native to Hugging Face transformers."""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoProcessor,
)

from .collating import HVPNetDataCollator, ImageAttacher, sample_subset, tokenize_and_align
from .configuration_hvpnet import HVPNetConfig
from .feature_cache import VisualFeatureCache
from .image_processing_hvpnet import HVPNetImageProcessor
from .loading import MNER_LABELS, load_image, load_mner_dataset, load_mre_dataset
from .metrics import align_word_predictions, metric_path
from .model_card import render_model_card
from .modeling_hvpnet import (
    HVPNetForSequenceClassification,
    HVPNetForTokenClassification,
    HVPNetModel,
    HVPNetPreTrainedModel,
)
from .pipelines import MultimodalNerPipeline, MultimodalRePipeline  # registers "multimodal-ner" and "multimodal-re"
from .processing_hvpnet import HVPNetProcessor
from .training import HVPNetTrainer, HVPNetTrainingArguments

AutoConfig.register(HVPNetConfig.model_type, HVPNetConfig, exist_ok=True)
AutoModel.register(HVPNetConfig, HVPNetModel, exist_ok=True)
AutoModelForTokenClassification.register(HVPNetConfig, HVPNetForTokenClassification, exist_ok=True)
AutoModelForSequenceClassification.register(HVPNetConfig, HVPNetForSequenceClassification, exist_ok=True)
AutoProcessor.register(HVPNetConfig, HVPNetProcessor, exist_ok=True)
AutoImageProcessor.register(HVPNetConfig, image_processor_classes={"pil": HVPNetImageProcessor}, exist_ok=True)
# Saved folders carry the configuration, modeling and processing files, so they load with trust_remote_code=True
# where this package is not installed.
HVPNetConfig.register_for_auto_class()
HVPNetModel.register_for_auto_class("AutoModel")
HVPNetForTokenClassification.register_for_auto_class("AutoModelForTokenClassification")
HVPNetForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
HVPNetProcessor.register_for_auto_class("AutoProcessor")
HVPNetImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = [
    "MNER_LABELS",
    "HVPNetConfig",
    "HVPNetDataCollator",
    "HVPNetForSequenceClassification",
    "HVPNetForTokenClassification",
    "HVPNetImageProcessor",
    "HVPNetModel",
    "HVPNetPreTrainedModel",
    "HVPNetProcessor",
    "HVPNetTrainer",
    "HVPNetTrainingArguments",
    "ImageAttacher",
    "MultimodalNerPipeline",
    "MultimodalRePipeline",
    "VisualFeatureCache",
    "align_word_predictions",
    "load_image",
    "load_mner_dataset",
    "load_mre_dataset",
    "metric_path",
    "render_model_card",
    "sample_subset",
    "tokenize_and_align",
]
