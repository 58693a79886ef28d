"""HVPNeT for multimodal NER and relation extraction, native to Hugging Face transformers."""

import importlib
from typing import TYPE_CHECKING, Any

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoModelForZeroShotObjectDetection,
    AutoProcessor,
)

from .configuration_hvpnet import HVPNetConfig
from .frozen_backbone import speed_up_frozen_backbone
from .image_processing_hvpnet import HVPNetImageProcessor, load_image
from .modeling_hvpnet import (
    HVPNetForGroundedTokenClassification,
    HVPNetForSequenceClassification,
    HVPNetForTokenClassification,
    HVPNetModel,
    HVPNetPreTrainedModel,
)
from .pipelines import (  # registers "multimodal-ner", "multimodal-re" and "multimodal-gmner"
    MultimodalGroundedNerPipeline,
    MultimodalNerPipeline,
    MultimodalRePipeline,
)
from .processing_hvpnet import HVPNetProcessor

# The data, training and publishing helpers import `datasets` and `Trainer` (which bring pandas and pyarrow, about
# 88 MiB of resident memory); they are imported on first use, so that using a model or a pipeline does not load them.
_LAZY_NAMES = {
    "HVPNetDataCollator": "collating",
    "ImageAttacher": "collating",
    "with_undecoded_images": "collating",
    "sample_subset": "collating",
    "tokenize_and_align": "collating",
    "VisualFeatureCache": "feature_cache",
    "MNER_LABELS": "loading",
    "load_cmner_dataset": "loading",
    "load_mner_dataset": "loading",
    "load_mre_dataset": "loading",
    "align_word_predictions": "metrics",
    "metric_path": "metrics",
    "render_model_card": "model_card",
    "HVPNetTrainer": "training",
    "HVPNetTrainingArguments": "training",
}

if TYPE_CHECKING:
    from .collating import HVPNetDataCollator, ImageAttacher, sample_subset, tokenize_and_align, with_undecoded_images
    from .feature_cache import VisualFeatureCache
    from .loading import MNER_LABELS, load_cmner_dataset, load_mner_dataset, load_mre_dataset
    from .metrics import align_word_predictions, metric_path
    from .model_card import render_model_card
    from .training import HVPNetTrainer, HVPNetTrainingArguments


def __getattr__(name: str) -> Any:
    if name not in _LAZY_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY_NAMES[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_NAMES))


AutoConfig.register(HVPNetConfig.model_type, HVPNetConfig, exist_ok=True)
AutoModel.register(HVPNetConfig, HVPNetModel, exist_ok=True)
AutoModelForTokenClassification.register(HVPNetConfig, HVPNetForTokenClassification, exist_ok=True)
AutoModelForSequenceClassification.register(HVPNetConfig, HVPNetForSequenceClassification, exist_ok=True)
AutoModelForZeroShotObjectDetection.register(HVPNetConfig, HVPNetForGroundedTokenClassification, exist_ok=True)
AutoProcessor.register(HVPNetConfig, HVPNetProcessor, exist_ok=True)
AutoImageProcessor.register(HVPNetConfig, image_processor_classes={"pil": HVPNetImageProcessor}, exist_ok=True)
# Saved folders carry the configuration, modeling and processing files, so they load with trust_remote_code=True
# where this package is not installed.
HVPNetConfig.register_for_auto_class()
HVPNetModel.register_for_auto_class("AutoModel")
HVPNetForTokenClassification.register_for_auto_class("AutoModelForTokenClassification")
HVPNetForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
HVPNetForGroundedTokenClassification.register_for_auto_class("AutoModelForZeroShotObjectDetection")
HVPNetProcessor.register_for_auto_class("AutoProcessor")
HVPNetImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = [
    "MNER_LABELS",
    "HVPNetConfig",
    "HVPNetDataCollator",
    "HVPNetForGroundedTokenClassification",
    "HVPNetForSequenceClassification",
    "HVPNetForTokenClassification",
    "HVPNetImageProcessor",
    "HVPNetModel",
    "HVPNetPreTrainedModel",
    "HVPNetProcessor",
    "HVPNetTrainer",
    "HVPNetTrainingArguments",
    "ImageAttacher",
    "MultimodalGroundedNerPipeline",
    "MultimodalNerPipeline",
    "MultimodalRePipeline",
    "VisualFeatureCache",
    "align_word_predictions",
    "load_cmner_dataset",
    "load_image",
    "load_mner_dataset",
    "load_mre_dataset",
    "metric_path",
    "render_model_card",
    "sample_subset",
    "speed_up_frozen_backbone",
    "tokenize_and_align",
    "with_undecoded_images",
]
