"""HVPNeT model configuration."""

from dataclasses import field
from typing import Any, Literal, get_args

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

# Text encoders whose self-attention has BERT's layout (query, key and value projections of the hidden states into
# heads, the same attention function and output): the visual prefix is prepended to their keys and values, and with
# every image masked the model is exactly the encoder's own model. Encoders whose attention differs (DeBERTa's
# disentangled attention, ModernBERT's rotary local/global attention, DistilBERT's fused layers, ...) are refused.
TEXT_MODEL_TYPES = (
    "bert", "camembert", "data2vec-text", "electra", "ernie", "roberta", "roberta-prelayernorm", "xlm-roberta",
    "xlm-roberta-xl",
)  # fmt: skip
PrefixMode = Literal["pyramid", "flat", "one_to_three", "original"]
RelationPooling = Literal["entity_markers", "cls"]
PREFIX_MODES = get_args(PrefixMode)
RELATION_POOLINGS = get_args(RelationPooling)


@strict
class HVPNetConfig(PreTrainedConfig):
    r"""
    Configuration of an HVPNeT model: a BERT-family text encoder whose self-attention layers also attend to a visual
    prefix built from a timm vision backbone (Chen et al., NAACL 2022 Findings). Settings of the wrong type, or that
    contradict each other, are refused when the configuration is built and when it is saved.

    Args:
        text_config (`PreTrainedConfig` or `dict`, *optional*):
            The text encoder's configuration, of one of the types in `TEXT_MODEL_TYPES` (`BertConfig`,
            `RobertaConfig`, `XLMRobertaConfig`, `ElectraConfig`, ...), kept as that type; a dict is read by its
            `model_type` (`"bert"` when it has none). Defaults to bert-base-uncased sizes.
        vision_backbone (`str`, *optional*, defaults to `"resnet50"`):
            Any timm model name that supports `features_only=True`: a CNN, a hierarchical transformer (Swin) or a
            plain ViT (CLIP, DINOv2); a tag (`"vit_base_patch16_clip_224.openai"`) picks the pretrained weights.
        vision_pretrained (`bool`, *optional*, defaults to `False`):
            Records whether the backbone started from pretrained weights. Building a model from a config never
            downloads weights; `from_text_vision_pretrained` loads them.
        vision_out_indices (`list[int]`, *optional*):
            Which backbone feature levels form the pyramid (timm `out_indices`). `None` takes the backbone's default
            levels: the last four levels of a CNN or hierarchical transformer (the four ResNet or Swin stages), and
            for a plain ViT, whose levels are blocks of one resolution, four blocks spread evenly over its depth
            (blocks 3, 6, 9 and 12 of a 12-block ViT).
        vision_model_args (`dict`, *optional*, defaults to `{}`):
            Extra keyword arguments of `timm.create_model` for the backbone, e.g. `{"img_size": 384}` for a ViT at
            another resolution, or the sizes of a small test model.
        freeze_vision (`bool`, *optional*, defaults to `True`):
            Run the backbone without autograd and keep its BatchNorm statistics fixed.
        vision_chunk_size (`int`, *optional*, defaults to 4):
            The backbone runs on at most this many images per call, so its peak memory follows the chunk; `None` runs
            all the images of a batch in one call (the trade-off is measured in `docs/benchmarks.md`).
        num_object_images (`int`, *optional*, defaults to 3):
            Maximum number of object crops per example (`m` in the paper).
        use_global_image (`bool`, *optional*, defaults to `True`):
            Whether the whole image contributes a prefix (False is the paper's *OnlyObj* ablation).
        prefix_grid (`int`, *optional*, defaults to 2):
            Each feature map is pooled to `prefix_grid x prefix_grid` tokens.
        prefix_mode (`str`, *optional*, defaults to `"pyramid"`):
            `"pyramid"`: the paper's dynamic gate over all stages for every layer; `"flat"`: every layer takes the
            last stage only; `"one_to_three"`: stage `i` feeds a fixed contiguous block of layers, no gate;
            `"original"`: the layout of the authors' released code, where absent images are zero images that are
            still attended (a masked image is then not the same as no image).
        use_visual_prefix (`bool`, *optional*, defaults to `True`):
            False gives a plain BERT (no visual parameters are created).
        classifier_dropout (`float`, *optional*):
            Dropout before the task head; defaults to the text encoder's hidden dropout.
        relation_pooling (`str`, *optional*, defaults to `"entity_markers"`):
            Relation head input: the hidden states at the head and tail start markers, concatenated, or `"cls"`.
        head_start_token_id (`int`, *optional*):
            Token id of the head entity start marker (`HVPNetProcessor.head_start_token_id`: `<s>` with BERT
            tokenizers).
        tail_start_token_id (`int`, *optional*):
            Token id of the tail entity start marker (`HVPNetProcessor.tail_start_token_id`: `<o>` with BERT
            tokenizers).

    Example:

    ```python
    >>> from hvpnet_hf import HVPNetConfig, HVPNetModel

    >>> # A BERT-base text encoder with a resnet50 prefix, three object crops per example
    >>> configuration = HVPNetConfig()

    >>> # A model with random weights (nothing is downloaded)
    >>> model = HVPNetModel(configuration)
    ```"""

    model_type = "hvpnet"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="bert")}

    text_config: dict | PreTrainedConfig | None = None
    vision_backbone: str = "resnet50"
    vision_pretrained: bool = False
    vision_out_indices: list[int] | None = None
    vision_model_args: dict[str, Any] = field(default_factory=dict)
    freeze_vision: bool = True
    vision_chunk_size: int | None = 4
    num_object_images: int = 3
    use_global_image: bool = True
    prefix_grid: int = 2
    prefix_mode: PrefixMode = "pyramid"
    use_visual_prefix: bool = True
    classifier_dropout: float | int | None = None
    relation_pooling: RelationPooling = "entity_markers"
    head_start_token_id: int | None = None
    tail_start_token_id: int | None = None

    def validate_text_config(self):
        """The visual prefix extends BERT's self-attention: other attention layouts are refused by name."""
        if self.text_config.model_type not in TEXT_MODEL_TYPES:
            raise ValueError(
                f"HVPNeT cannot use a text encoder of model_type {self.text_config.model_type!r}: its self-attention "
                "does not have BERT's layout, which the visual prefix extends. Supported text model types: "
                f"{', '.join(TEXT_MODEL_TYPES)}"
            )

    def validate_vision_backbone(self):
        """The backbone's levels, call size and timm arguments."""
        if self.vision_chunk_size is not None and self.vision_chunk_size < 1:
            raise ValueError(f"vision_chunk_size must be >= 1 or None (all at once), got {self.vision_chunk_size}")
        if self.vision_out_indices == []:
            raise ValueError(
                "vision_out_indices must be None (chosen from the backbone) or a non-empty list of backbone feature "
                "levels (int), got []"
            )
        if self.vision_out_indices is not None and len(set(self.vision_out_indices)) < len(self.vision_out_indices):
            raise ValueError(f"vision_out_indices names a level twice: {self.vision_out_indices}")
        reserved = {"pretrained", "features_only", "out_indices"} & set(self.vision_model_args)
        if reserved:
            raise ValueError(
                f"vision_model_args must not set {sorted(reserved)}: they follow vision_pretrained and "
                "vision_out_indices"
            )

    def validate_visual_prefix(self):
        """The images and the pooled grid that the prefix is built from."""
        if self.num_object_images < 0:
            raise ValueError(f"num_object_images must be >= 0, got {self.num_object_images}")
        if self.prefix_grid < 1:
            raise ValueError(f"prefix_grid must be >= 1, got {self.prefix_grid}")
        if self.use_visual_prefix and not self.use_global_image and self.num_object_images == 0:
            raise ValueError("use_global_image=False with num_object_images=0 leaves no image to build a prefix from")

    @property
    def num_images(self) -> int:
        """Images per example that contribute a prefix: the global image (if used) plus the object crops."""
        return int(self.use_global_image) + self.num_object_images

    @property
    def prefix_length(self) -> int:
        """Visual prefix tokens per layer: `prefix_grid**2` per image."""
        return self.num_images * self.prefix_grid**2


__all__ = ["HVPNetConfig"]
