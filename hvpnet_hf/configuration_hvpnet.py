"""HVPNeT model configuration."""

from transformers import AutoConfig, BertConfig, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

# Text encoders whose self-attention has BERT's layout (query, key and value projections of the hidden states into
# heads, the same attention function and output): the visual prefix is prepended to their keys and values, and with
# every image masked the model is exactly the encoder's own model. Encoders whose attention differs (DeBERTa's
# disentangled attention, ModernBERT's rotary local/global attention, DistilBERT's fused layers, ...) are refused.
TEXT_MODEL_TYPES = (
    "bert", "camembert", "data2vec-text", "electra", "ernie", "roberta", "roberta-prelayernorm", "xlm-roberta",
    "xlm-roberta-xl",
)  # fmt: skip
PREFIX_MODES = ("pyramid", "flat", "one_to_three", "original")
RELATION_POOLINGS = ("entity_markers", "cls")


class HVPNetConfig(PretrainedConfig):
    r"""
    Configuration of an HVPNeT model: a BERT-family text encoder whose self-attention layers also attend to a visual
    prefix built from a timm vision backbone (Chen et al., NAACL 2022 Findings).

    Args:
        text_config (`PretrainedConfig` or `dict`, *optional*):
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
            Which backbone feature levels form the pyramid (timm `out_indices`). `None` lets the backbone choose when
            the model is built, which then records the levels here: the last four levels of a CNN or hierarchical
            transformer (the four ResNet or Swin stages), and for a plain ViT, whose levels are blocks of one
            resolution, four blocks spread evenly over its depth (blocks 3, 6, 9 and 12 of a 12-block ViT).
        vision_model_args (`dict`, *optional*):
            Extra keyword arguments of `timm.create_model` for the backbone, e.g. `{"img_size": 384}` for a ViT at
            another resolution, or the sizes of a small test model.
        freeze_vision (`bool`, *optional*, defaults to `True`):
            Run the backbone without autograd and keep its BatchNorm statistics fixed.
        vision_chunk_size (`int`, *optional*, defaults to 4):
            The backbone runs on at most this many images per call, so its peak memory follows the chunk (and on
            CPU, calls of a few resnet50 images are faster than one call on a whole batch of 32); `None` runs all
            the images of a batch in one call. At the paper's settings calls of 4 lower the peak memory of an fp32
            inference batch by 0.07 GiB against calls of 8, at the same speed, and make a training step 3-4%
            slower (`benchmarks/bench_original.py --chunk-size`).
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
    """

    model_type = "hvpnet"
    sub_configs = {"text_config": AutoConfig}

    def __init__(
        self,
        text_config: PretrainedConfig | dict | None = None,
        vision_backbone: str = "resnet50",
        vision_pretrained: bool = False,
        vision_out_indices: list[int] | tuple[int, ...] | None = None,
        vision_model_args: dict | None = None,
        freeze_vision: bool = True,
        vision_chunk_size: int | None = 4,
        num_object_images: int = 3,
        use_global_image: bool = True,
        prefix_grid: int = 2,
        prefix_mode: str = "pyramid",
        use_visual_prefix: bool = True,
        classifier_dropout: float | None = None,
        relation_pooling: str = "entity_markers",
        head_start_token_id: int | None = None,
        tail_start_token_id: int | None = None,
        **kwargs,
    ):
        if text_config is None:
            text_config = BertConfig()
        elif isinstance(text_config, dict):
            settings = dict(text_config)
            model_type = settings.pop("model_type", "bert")
            _check_text_model_type(model_type)
            text_config = CONFIG_MAPPING[model_type](**settings)
        _check_text_model_type(text_config.model_type)
        self.text_config = text_config
        self.vision_backbone = vision_backbone
        self.vision_pretrained = vision_pretrained
        self.vision_out_indices = None if vision_out_indices is None else list(vision_out_indices)
        self.vision_model_args = dict(vision_model_args or {})
        self.freeze_vision = freeze_vision
        self.vision_chunk_size = vision_chunk_size
        self.num_object_images = num_object_images
        self.use_global_image = use_global_image
        self.prefix_grid = prefix_grid
        self.prefix_mode = prefix_mode
        self.use_visual_prefix = use_visual_prefix
        self.classifier_dropout = classifier_dropout
        self.relation_pooling = relation_pooling
        self.head_start_token_id = head_start_token_id
        self.tail_start_token_id = tail_start_token_id
        super().__init__(**kwargs)
        self._validate()

    def _validate(self) -> None:
        if self.prefix_mode not in PREFIX_MODES:
            raise ValueError(f"prefix_mode must be one of {PREFIX_MODES}, got {self.prefix_mode!r}")
        if self.relation_pooling not in RELATION_POOLINGS:
            raise ValueError(f"relation_pooling must be one of {RELATION_POOLINGS}, got {self.relation_pooling!r}")
        if self.num_object_images < 0:
            raise ValueError(f"num_object_images must be >= 0, got {self.num_object_images}")
        if self.prefix_grid < 1:
            raise ValueError(f"prefix_grid must be >= 1, got {self.prefix_grid}")
        if self.vision_chunk_size is not None and self.vision_chunk_size < 1:
            raise ValueError(f"vision_chunk_size must be >= 1 or None (all at once), got {self.vision_chunk_size}")
        if self.vision_out_indices is not None:
            if not self.vision_out_indices or not all(isinstance(index, int) for index in self.vision_out_indices):
                raise ValueError(
                    f"vision_out_indices must be None (chosen from the backbone) or a non-empty list of backbone "
                    f"feature levels (int), got {self.vision_out_indices!r}"
                )
            if len(set(self.vision_out_indices)) < len(self.vision_out_indices):
                raise ValueError(f"vision_out_indices names a level twice: {self.vision_out_indices}")
        reserved = {"pretrained", "features_only", "out_indices"} & set(self.vision_model_args)
        if reserved:
            raise ValueError(
                f"vision_model_args must not set {sorted(reserved)}: they follow vision_pretrained and "
                "vision_out_indices"
            )
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


def _check_text_model_type(model_type: str) -> None:
    if model_type not in TEXT_MODEL_TYPES:
        raise ValueError(
            f"HVPNeT cannot use a text encoder of model_type {model_type!r}: its self-attention does not have BERT's "
            f"layout, which the visual prefix extends. Supported text model types: {', '.join(TEXT_MODEL_TYPES)}"
        )


__all__ = ["HVPNetConfig"]
