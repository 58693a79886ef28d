"""PyTorch HVPNeT: a BERT-family encoder whose self-attention layers also attend to a hierarchical visual prefix.

Chen et al., "Good Visual Guidance Makes A Better Extractor: Hierarchical Visual Prefix for Multimodal Entity and
Relation Extraction", NAACL 2022 Findings. Section numbers in comments refer to that paper.

Shapes: B = batch, T = text length, n = images per example (global image + object crops), L = text layers,
c = backbone stages, g = prefix grid side, P = n * g * g prefix tokens, d = hidden size, H = heads, h = head size.
"""

import inspect
import os
import platform
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from difflib import get_close_matches
from functools import cache

import timm
import torch
from timm.layers import Format
from torch import nn
from torch.overrides import TorchFunctionMode
from torchcrf import CRF
from transformers import AutoConfig, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import ModelOutput, SequenceClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.bert.modeling_bert import BertLayer, BertModel, BertSelfAttention, eager_attention_forward
from transformers.models.camembert.modeling_camembert import CamembertLayer, CamembertModel, CamembertSelfAttention
from transformers.models.data2vec.modeling_data2vec_text import (
    Data2VecTextLayer,
    Data2VecTextModel,
    Data2VecTextSelfAttention,
)
from transformers.models.electra.modeling_electra import ElectraLayer, ElectraModel, ElectraSelfAttention
from transformers.models.ernie.modeling_ernie import ErnieLayer, ErnieModel, ErnieSelfAttention
from transformers.models.roberta.modeling_roberta import RobertaLayer, RobertaModel, RobertaSelfAttention
from transformers.models.roberta_prelayernorm.modeling_roberta_prelayernorm import (
    RobertaPreLayerNormLayer,
    RobertaPreLayerNormModel,
    RobertaPreLayerNormSelfAttention,
)
from transformers.models.xlm_roberta.modeling_xlm_roberta import (
    XLMRobertaLayer,
    XLMRobertaModel,
    XLMRobertaSelfAttention,
)
from transformers.models.xlm_roberta_xl.modeling_xlm_roberta_xl import (
    XLMRobertaXLLayer,
    XLMRobertaXLModel,
    XLMRobertaXLSelfAttention,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, logging
from transformers.utils.generic import can_return_tuple

from .configuration_hvpnet import HVPNetConfig

logger = logging.get_logger(__name__)


@dataclass
class HVPNetModelOutput(ModelOutput):
    """
    last_hidden_state: (B, T, d) text states of the last layer.
    pooler_output: (B, d) the text encoder's pooler over its first token, when it has one (ELECTRA has none).
    hidden_states: tuple of L + 1 tensors (B, T, d), embeddings first, when `output_hidden_states=True`.
    attentions: tuple of L tensors (B, H, T, P + T), prefix keys first, when `output_attentions=True`; under sdpa,
        which computes no weights, an empty tuple (with transformers' warning), as for BERT.
    gate_weights: (B, n, L, c) the dynamic gate of every image and layer (paper Figure 4), when
        `output_gate_weights=True`; in the paper modes, rows of absent images are zero.
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    gate_weights: torch.FloatTensor | None = None


@dataclass
class HVPNetTokenClassifierOutput(ModelOutput):
    """
    loss: CRF negative log-likelihood averaged over the batch, when `labels` are given.
    logits: (B, T, num_labels) emission scores.
    predicted_tags: (B, T) Viterbi tag ids at first sub-word positions and -100 elsewhere (eval mode only).
    hidden_states, attentions, gate_weights: as in `HVPNetModelOutput`.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    predicted_tags: torch.LongTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    gate_weights: torch.FloatTensor | None = None


@dataclass
class VisualPrefix:
    """Per-layer visual prefix: keys and values, one (B, H, P, h) tensor per layer (tuples of L; inside a layer, that
    layer's own), mask (B, P) True where an image is present, gate weights (B, n, L, c).

    One tensor per layer rather than one (L, B, H, P, h) tensor: the backward of a layer's slice of a stacked tensor
    would fill a zero tensor of the whole stack for each layer."""

    keys: tuple[torch.Tensor, ...] | torch.Tensor
    values: tuple[torch.Tensor, ...] | torch.Tensor
    mask: torch.Tensor
    gate_weights: torch.Tensor


class HVPNetSelfAttention(BertSelfAttention):
    """BERT self-attention whose keys and values are prefixed by this layer's visual prefix (paper eq. 9).

    `HVPNetModel` hands the prefix of all layers down through the text model as the keyword argument
    `visual_prefix`; each layer (`HVPNetLayerMixin`) hands its attention its own keys and values, which it prepends
    to the text's, and the prefix columns to the text mask that the text model built. Queries stay text-only, so the
    output keeps the text length.
    """

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        visual_prefix: VisualPrefix | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.attention_head_size)
        query = self.query(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.key(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.value(hidden_states).view(hidden_shape).transpose(1, 2)
        if visual_prefix is not None:
            key = torch.cat([visual_prefix.keys.to(key.dtype), key], dim=2)
            value = torch.cat([visual_prefix.values.to(value.dtype), value], dim=2)
            attention_mask = _prepend_prefix_mask(attention_mask, visual_prefix.mask, query)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.dropout.p if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        return attn_output.reshape(*input_shape, -1).contiguous(), attn_weights


# The same attention for the other supported families. transformers gives each its own self-attention class, with
# BERT's modules (`query`, `key`, `value`, `dropout`), sizes and forward; the prefix attention subclasses the
# family's class, so its weights load under the family's names and `isinstance` checks on that class hold.
class HVPNetCamembertSelfAttention(CamembertSelfAttention):
    forward = HVPNetSelfAttention.forward


class HVPNetData2VecTextSelfAttention(Data2VecTextSelfAttention):
    forward = HVPNetSelfAttention.forward


class HVPNetElectraSelfAttention(ElectraSelfAttention):
    forward = HVPNetSelfAttention.forward


class HVPNetErnieSelfAttention(ErnieSelfAttention):
    forward = HVPNetSelfAttention.forward


class HVPNetRobertaSelfAttention(RobertaSelfAttention):
    forward = HVPNetSelfAttention.forward


class HVPNetRobertaPreLayerNormSelfAttention(RobertaPreLayerNormSelfAttention):
    forward = HVPNetSelfAttention.forward


class HVPNetXLMRobertaSelfAttention(XLMRobertaSelfAttention):
    forward = HVPNetSelfAttention.forward


class HVPNetXLMRobertaXLSelfAttention(XLMRobertaXLSelfAttention):
    forward = HVPNetSelfAttention.forward


class HVPNetLayerMixin:
    """Makes a text layer of the family it is mixed into take the visual prefix's keys and values as positional
    inputs, and its self-attention the prefix attention `prefix_attention_class`.

    The text model hands the prefix to every layer as the keyword argument `visual_prefix`. Reentrant activation
    checkpointing (`use_reentrant=True`) only tracks a layer's positional tensors: with the prefix as a keyword, each
    layer's recomputation in backward would backpropagate through the prefix encoder's graph on its own, and the
    second layer finds that graph freed. So `__call__` (which checkpoints, in transformers' `GradientCheckpointingLayer`)
    gets this layer's keys and values as positional arguments, as BERT passes `encoder_hidden_states`, whatever
    checkpoint function is installed, and `forward` hands them to the attention in the prefix.

    The prefix layer and attention classes add forwards only, no weights or other state: `build_text_model` turns
    the layers the family built into them by changing their class.
    """

    prefix_attention_class: type[nn.Module]

    def __call__(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        visual_prefix: VisualPrefix | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if visual_prefix is None:
            return super().__call__(hidden_states, attention_mask, encoder_hidden_states, **kwargs)
        layer = self.attention.self.layer_idx
        return super().__call__(
            hidden_states,
            attention_mask,
            encoder_hidden_states,
            visual_prefix.keys[layer],
            visual_prefix.values[layer],
            visual_prefix=visual_prefix,
            **kwargs,
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        prefix_keys: torch.Tensor | None = None,
        prefix_values: torch.Tensor | None = None,
        visual_prefix: VisualPrefix | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        """prefix_keys, prefix_values: (B, H, P, h) this layer's keys and values of `visual_prefix`, as positional
        inputs."""
        if visual_prefix is not None:
            visual_prefix = replace(visual_prefix, keys=prefix_keys, values=prefix_values)
        return super().forward(
            hidden_states, attention_mask, encoder_hidden_states, visual_prefix=visual_prefix, **kwargs
        )


class HVPNetLayer(HVPNetLayerMixin, BertLayer):
    prefix_attention_class = HVPNetSelfAttention


class HVPNetCamembertLayer(HVPNetLayerMixin, CamembertLayer):
    prefix_attention_class = HVPNetCamembertSelfAttention


class HVPNetData2VecTextLayer(HVPNetLayerMixin, Data2VecTextLayer):
    prefix_attention_class = HVPNetData2VecTextSelfAttention


class HVPNetElectraLayer(HVPNetLayerMixin, ElectraLayer):
    prefix_attention_class = HVPNetElectraSelfAttention


class HVPNetErnieLayer(HVPNetLayerMixin, ErnieLayer):
    prefix_attention_class = HVPNetErnieSelfAttention


class HVPNetRobertaLayer(HVPNetLayerMixin, RobertaLayer):
    prefix_attention_class = HVPNetRobertaSelfAttention


class HVPNetRobertaPreLayerNormLayer(HVPNetLayerMixin, RobertaPreLayerNormLayer):
    prefix_attention_class = HVPNetRobertaPreLayerNormSelfAttention


class HVPNetXLMRobertaLayer(HVPNetLayerMixin, XLMRobertaLayer):
    prefix_attention_class = HVPNetXLMRobertaSelfAttention


class HVPNetXLMRobertaXLLayer(HVPNetLayerMixin, XLMRobertaXLLayer):
    prefix_attention_class = HVPNetXLMRobertaXLSelfAttention


# `text_config.model_type` → the family's own text model and the prefix layer that replaces its layers (the types
# `configuration_hvpnet.TEXT_MODEL_TYPES` accepts).
TEXT_MODELS: dict[str, tuple[type[PreTrainedModel], type[nn.Module]]] = {
    "bert": (BertModel, HVPNetLayer),
    "camembert": (CamembertModel, HVPNetCamembertLayer),
    "data2vec-text": (Data2VecTextModel, HVPNetData2VecTextLayer),
    "electra": (ElectraModel, HVPNetElectraLayer),
    "ernie": (ErnieModel, HVPNetErnieLayer),
    "roberta": (RobertaModel, HVPNetRobertaLayer),
    "roberta-prelayernorm": (RobertaPreLayerNormModel, HVPNetRobertaPreLayerNormLayer),
    "xlm-roberta": (XLMRobertaModel, HVPNetXLMRobertaLayer),
    "xlm-roberta-xl": (XLMRobertaXLModel, HVPNetXLMRobertaXLLayer),
}


def build_text_model(text_config, add_pooling_layer: bool) -> PreTrainedModel:
    """The family's own text model for `text_config`, its layers replaced by the prefix layers (same weight names;
    ELECTRA has no pooler, whatever `add_pooling_layer` says)."""
    model_class, layer_class = TEXT_MODELS[text_config.model_type]
    pooling = {} if model_class is ElectraModel else {"add_pooling_layer": add_pooling_layer}
    text_model = model_class(text_config, **pooling)
    # The family's layers become prefix layers in place (the prefix classes add forwards only): building prefix
    # layers to replace them would build every layer's weights twice, and the freed set would stay behind as holes
    # in the heap, raising the peak memory of the steps that follow (`benchmarks/bench_original.py`).
    for layer in text_model.encoder.layer:
        layer.__class__ = layer_class
        layer.attention.self.__class__ = layer_class.prefix_attention_class
    return text_model


def _prepend_prefix_mask(
    attention_mask: torch.Tensor | None, prefix_mask: torch.Tensor, query: torch.Tensor
) -> torch.Tensor:
    """Extend the text mask the text model built to the prefix keys, which come first.

    attention_mask: None (every text key visible), boolean (B, 1, T, T) True where visible (sdpa), or additive
        (B, 1, T, T) with 0 or the dtype's minimum (eager). prefix_mask: (B, P) True where the image is present.
    Returns a mask of the same kind over P + T keys; from None, an additive one (eager and sdpa both take it).
    """
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        prefix_columns = prefix_mask[:, None, None, :].expand(-1, 1, attention_mask.shape[2], -1)
        return torch.cat([prefix_columns.to(attention_mask.device), attention_mask], dim=-1)
    dtype = query.dtype if attention_mask is None else attention_mask.dtype
    prefix_columns = torch.zeros(prefix_mask.shape, dtype=dtype, device=query.device)
    prefix_columns = prefix_columns.masked_fill(~prefix_mask.to(query.device), torch.finfo(dtype).min)
    prefix_columns = prefix_columns[:, None, None, :]
    if attention_mask is None:
        text_columns = prefix_columns.new_zeros(query.shape[0], 1, 1, query.shape[2])
    else:
        text_columns = attention_mask
        prefix_columns = prefix_columns.expand(-1, 1, attention_mask.shape[2], -1)
    return torch.cat([prefix_columns, text_columns], dim=-1)


# When `vision_out_indices` is None, the prefix reads this many backbone levels: the paper's four ResNet stages.
NUM_DEFAULT_LEVELS = 4


def create_feature_backbone(config: HVPNetConfig, pretrained: bool | str = False) -> nn.Module:
    """The timm feature extractor (`features_only=True`) of `config.vision_backbone` at the levels
    `config.vision_out_indices`, which is first set to `default_out_indices` when None. `pretrained`: False (random
    weights, nothing downloaded), True (timm's pretrained weights) or the path of a local checkpoint file."""
    if config.vision_out_indices is None:
        config.vision_out_indices = default_out_indices(config.vision_backbone, config.vision_model_args)
    return _timm_features(
        config.vision_backbone,
        config.vision_model_args,
        pretrained=bool(pretrained),
        out_indices=tuple(config.vision_out_indices),
        pretrained_cfg_overlay={"file": pretrained} if isinstance(pretrained, str) else None,
    )


def default_out_indices(backbone: str, model_args: dict) -> list[int]:
    """The backbone levels a prefix reads by default. A plain ViT's levels are its blocks, all of one resolution:
    four of them spread evenly over its depth, as DPT (Ranftl et al., ICCV 2021) reads blocks 3, 6, 9 and 12 of a
    ViT-B (its last four blocks would see nearly the same features). Any other backbone (CNN, Swin): its last four
    levels, the four ResNet stages of the paper."""
    with torch.device("meta"):  # only the layout of the levels is read: no weights are allocated or initialised
        levels = _timm_features(backbone, model_args, pretrained=False).feature_info.info
    count = len(levels)
    if len({level["reduction"] for level in levels}) == 1 and count > NUM_DEFAULT_LEVELS:
        return [count * (level + 1) // NUM_DEFAULT_LEVELS - 1 for level in range(NUM_DEFAULT_LEVELS)]
    return list(range(max(count - NUM_DEFAULT_LEVELS, 0), count))


def _timm_features(backbone: str, model_args: dict, **kwargs) -> nn.Module:
    """`timm.create_model(backbone, features_only=True, ...)`, with an error naming the backbone when timm cannot
    build it as a feature extractor (an unknown name, a model without feature maps, a wrong model argument)."""
    # Without a classifier (`num_classes=0`): the feature extractor drops it, and building it would only allocate
    # and free its weights (8 MB for resnet50's).
    try:
        return timm.create_model(backbone, features_only=True, **{"num_classes": 0, **model_args}, **kwargs)
    except (AssertionError, AttributeError, RuntimeError, TypeError) as error:
        raise ValueError(
            f"vision_backbone {backbone!r}: timm cannot build it with features_only=True, which HVPNeT reads its "
            f"visual prefix from ({type(error).__name__}: {error})"
        ) from error


class HVPNetVisionEncoderBase(nn.Module):
    """What the prefix encoders share: sizes read from the config and the timm feature pyramid
    (`features_only=True`, levels `config.vision_out_indices`), frozen when `config.freeze_vision`: no autograd
    through it and fixed BatchNorm statistics. Building it never downloads weights.

    Every encoder has a fixed part, `visual_features` (backbone and pooling to the prefix grid: what a feature cache
    stores when the backbone is frozen), and a trainable part, `prefix_from_features`; `forward` chains the two.
    """

    def __init__(self, config: HVPNetConfig):
        super().__init__()
        text_config = config.text_config
        self.num_layers = text_config.num_hidden_layers
        self.num_heads = text_config.num_attention_heads
        self.hidden_size = text_config.hidden_size
        self.grid = config.prefix_grid
        self.freeze_backbone = config.freeze_vision
        self.chunk_size = config.vision_chunk_size
        self.backbone = create_feature_backbone(config)
        # EfficientNet and MobileNetV3 features come from timm classes of their own, channels first, that do not
        # set `output_fmt`.
        self.maps_channels_last = Format(getattr(self.backbone, "output_fmt", Format.NCHW)) == Format.NHWC
        # timm zero-initialises the last BatchNorm weight of every residual block (`zero_init_last`); mark those
        # BatchNorms so that `_init_weights` does the same for weights missing from a checkpoint.
        for block in self.backbone.modules():
            if hasattr(block, "zero_init_last"):
                [*_, last_norm] = (child for child in block.children() if isinstance(child, nn.BatchNorm2d))
                last_norm.zero_init_weight = True
        if self.freeze_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()
            fold_batch_norms(self.backbone)
            self._hold_convolutions_channels_last()

    def train(self, mode: bool = True) -> "HVPNetVisionEncoderBase":
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self

    def visual_features(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, 3, H, W) → (N, g*g, C) the pooled backbone features, C channels over the used stages.

        The backbone sees at most `config.vision_chunk_size` images per call, so its peak memory follows the chunk,
        in `channels_last` layout (faster for resnet50 on CPU at every chunk size, `benchmarks/bench_train_step.py`).
        """
        # An exported graph runs all images in one call: the number of chunks would tie it to one batch size.
        chunked = self.chunk_size and not torch.compiler.is_exporting()
        chunks = images.split(self.chunk_size) if chunked else (images,)
        if self.freeze_backbone and not torch.compiler.is_compiling():
            self._hold_convolutions_channels_last()
        # Pixels arrive in float32; a backbone held in bfloat16 (`hold_backbone_in`, a bf16 model) takes them in its
        # own dtype.
        dtype = next(self.backbone.parameters()).dtype
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            return torch.cat(
                [
                    self.pool_feature_maps(
                        self.backbone(chunk.to(dtype).contiguous(memory_format=torch.channels_last))
                    )
                    for chunk in chunks
                ]
            )

    def _hold_convolutions_channels_last(self) -> None:
        """Give a frozen backbone's convolution weights the channels_last layout of its inputs, when it is built and
        again if loading replaced them: with weights as saved, every convolution call would reorder its weights."""
        weight = next((parameter for parameter in self.backbone.parameters() if parameter.dim() == 4), None)
        if weight is not None and not weight.is_contiguous(memory_format=torch.channels_last):
            self.backbone.to(memory_format=torch.channels_last)

    def hold_backbone_in(self, dtype: torch.dtype) -> None:
        """Keep the frozen backbone's weights in `dtype` (bfloat16 for bf16 training): under autocast its
        convolutions compute in bfloat16 anyway, but autocast only caches the casts of trainable weights, so it
        would cast every frozen weight again on every call. The trainable prefix layers stay as they are."""
        if not self.freeze_backbone:
            raise ValueError("only a frozen backbone (freeze_vision=True) can be held in another dtype")
        self.backbone.to(dtype)

    def pool_feature_maps(self, feature_maps: list[torch.Tensor]) -> torch.Tensor:
        """One map (N, C_i, H_i, W_i) per pyramid level → (N, g*g, C) the features the trainable part reads."""
        raise NotImplementedError

    def prefix_from_features(self, features: torch.Tensor, present: torch.Tensor) -> VisualPrefix:
        """features (B, n, g*g, C) from `visual_features`, present (B, n) bool → the per-layer visual prefix."""
        raise NotImplementedError

    def load_pretrained_backbone(self, pretrained: bool | str, config: HVPNetConfig) -> None:
        """Load timm's pretrained weights (`True`) or a local checkpoint file (a path) into the backbone."""
        self.backbone.load_state_dict(create_feature_backbone(config, pretrained).state_dict())

    def channels_first(self, feature_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """The backbone's maps as (N, C_i, H_i, W_i). Hierarchical transformers such as Swin give them channels last,
        (N, H_i, W_i, C_i), as timm's `output_fmt` says; plain ViTs come as grids of their patch tokens, without the
        class and register tokens (timm's `forward_intermediates` leaves those out)."""
        if self.maps_channels_last:
            return [feature_map.permute(0, 3, 1, 2) for feature_map in feature_maps]
        return feature_maps


class HVPNetVisualPrefixEncoder(HVPNetVisionEncoderBase):
    """Images → per-layer visual prefix (paper §3.1–3.3), for all images and all layers in batched operations."""

    def __init__(self, config: HVPNetConfig):
        super().__init__(config)
        self.prefix_mode = config.prefix_mode
        channels = self.backbone.feature_info.channels()
        # "flat" uses the last stage only; the other modes use every stage.
        self.stage_indices = [len(channels) - 1] if self.prefix_mode == "flat" else list(range(len(channels)))
        self.stage_channels = [channels[i] for i in self.stage_indices]
        num_stages = len(self.stage_indices)
        # Eq. 1-2: a 1x1 convolution per stage. It commutes with average pooling, so it runs on the g*g pooled
        # tokens as a linear layer instead of on the full map.
        self.stage_projections = nn.ModuleList(nn.Linear(size, self.hidden_size) for size in self.stage_channels)
        if self.prefix_mode == "pyramid":
            # Eq. 3: the L gate MLPs W_l (d -> c) as one linear layer d -> L * c.
            self.gate = nn.Linear(self.hidden_size, self.num_layers * num_stages)
        else:
            self.register_buffer("fixed_gate", self._fixed_gate(num_stages), persistent=False)
        # Eq. 8: the L key/value projections W_l^phi (d -> 2d), one module per layer. Not one stacked (L, 2d, d)
        # weight: glibc's malloc maps blocks over 32 MiB fresh from the system and unmaps them when freed, so that
        # weight's gradient (57 MB at bert-base) was faulted in anew every step, at the end of backward, where the
        # training peak is. Built without the constructor's random draws, which `_init_weights` would overwrite.
        self.key_value_projections = nn.ModuleList(
            torch.nn.utils.skip_init(nn.Linear, self.hidden_size, 2 * self.hidden_size) for _ in range(self.num_layers)
        )

    def _fixed_gate(self, num_stages: int) -> torch.Tensor:
        """(L, c) one-hot routing of the ablations: "flat" (one stage) or "one_to_three" (stage i feeds a contiguous
        block of layers: with 12 layers and 4 stages, layers 3i..3i+2)."""
        stage_of_layer = torch.arange(self.num_layers) * num_stages // self.num_layers
        return nn.functional.one_hot(stage_of_layer, num_stages).float()

    def pool_feature_maps(self, feature_maps: list[torch.Tensor]) -> torch.Tensor:
        """Every used stage average-pooled to g x g, as g*g tokens, concatenated on channels: (N, g*g, C)."""
        feature_maps = self.channels_first(feature_maps)
        pooled = [nn.functional.adaptive_avg_pool2d(feature_maps[i], self.grid) for i in self.stage_indices]
        return torch.cat([grid.flatten(2).transpose(1, 2) for grid in pooled], dim=2)

    def gated_features(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features (N, g*g, C) → gated prefix features (N, L, g*g, d) and gate weights (N, L, c)."""
        stage_features = features.split(self.stage_channels, dim=2)
        stage_tokens = torch.stack(
            [projection(tokens) for projection, tokens in zip(self.stage_projections, stage_features, strict=True)],
            dim=1,
        )  # (N, c, g*g, d)
        if self.prefix_mode == "pyramid":
            # Eq. 3-4: average over stages of each stage's global average pool, then per-layer gate logits.
            summary = stage_tokens.mean(dim=(1, 2))
            logits = nn.functional.leaky_relu(self.gate(summary)).view(features.shape[0], self.num_layers, -1)
            # The softmax in float32 also under autocast or in a bf16 model; the gated sum in the stages' dtype.
            gate_weights = logits.float().softmax(dim=-1).to(stage_tokens.dtype)
        else:
            gate_weights = self.fixed_gate.to(stage_tokens.dtype).expand(features.shape[0], -1, -1)
        # Eq. 5: gated sum over stages, for every layer at once.
        return torch.einsum("nlc,nctd->nltd", gate_weights, stage_tokens), gate_weights

    def forward(self, images: torch.Tensor, present: torch.Tensor) -> VisualPrefix:
        """images (B, n, 3, H, W) global image first, then object crops; present (B, n) bool."""
        if torch.compiler.is_compiling() and not self.backbone.training:
            # A compiled or exported graph cannot branch on the mask or index by it: every image goes through the
            # backbone and `prefix_from_features` masks out the absent ones. With BatchNorm's running statistics
            # (eval mode) each image is encoded on its own, so the prefix is the same as below.
            features = self.visual_features(images.flatten(0, 1))
            return self.prefix_from_features(features.view(*present.shape, *features.shape[1:]), present)
        # Eager PyTorch skips absent images before the backbone: with 6 of 16 absent that is 1.6x faster than
        # pushing them through (`benchmarks/bench_prefix.py`), and in training a trainable backbone's batch
        # statistics see only real images.
        flat_present, flat_images = present.flatten(), images.flatten(0, 1)
        if flat_present.all():  # nothing to skip: no copy of the pixels (19 MB at the paper's batch) and no scatter
            features = self.visual_features(flat_images)
        else:
            features = images.new_zeros(flat_present.numel(), self.grid**2, sum(self.stage_channels))
            if flat_present.any():  # autocast may give lower-precision features
                features[flat_present] = self.visual_features(flat_images[flat_present]).to(features.dtype)
        return self.prefix_from_features(features.view(*present.shape, *features.shape[1:]), present)

    def prefix_from_features(self, features: torch.Tensor, present: torch.Tensor) -> VisualPrefix:
        """features (B, n, g*g, C) from `visual_features` (rows of absent images are not read); present (B, n)."""
        batch_size, num_images = present.shape
        # Cached or backbone features, to the layers' dtype.
        features = features.to(self.stage_projections[0].weight.dtype)
        # Masks, not indexing, so that the graph has no data-dependent shapes (torch.export, torch.compile). Absent
        # rows are zeroed first (a cache may hold anything there, and NaN would reach the gradients of the weights),
        # gated like the others, and zeroed again.
        flat_present = present.flatten()[:, None, None].to(features.device)
        flat_features = features.flatten(0, 1).masked_fill(~flat_present, 0.0)
        gated, gate_weights = self.gated_features(flat_features)
        gated = gated.masked_fill(~flat_present[..., None], 0.0).to(features.dtype)
        gate_weights = gate_weights.masked_fill(~flat_present, 0.0).to(features.dtype)

        # Eq. 6: concatenate the images of one example on the token axis: (B, L, P, d).
        prefix = gated.view(batch_size, num_images, self.num_layers, -1, self.hidden_size).transpose(1, 2)
        prefix = prefix.flatten(2, 3)
        # Eq. 8: each layer's projection to keys and values, split into heads: (2, B, H, P, h) per layer.
        key_values = [
            projection(prefix[:, layer])
            .view(batch_size, prefix.shape[2], 2, self.num_heads, -1)
            .permute(2, 0, 3, 1, 4)
            for layer, projection in enumerate(self.key_value_projections)
        ]
        return VisualPrefix(
            keys=tuple(key_value[0] for key_value in key_values),
            values=tuple(key_value[1] for key_value in key_values),
            mask=present.repeat_interleave(self.grid**2, dim=1),
            gate_weights=gate_weights.view(batch_size, num_images, self.num_layers, -1),
        )

    @property
    def num_stages(self) -> int:
        return len(self.stage_indices)


def fold_batch_norms(backbone: nn.Module) -> int:
    """Fold every BatchNorm of a frozen backbone that only normalises a convolution's output into that convolution;
    returns how many were folded. Both modules are replaced by ones that keep their parameters and buffers, under the
    same names (the state dict does not change): the convolution runs with weight * s and bias beta - mean * s,
    where s = gamma / sqrt(var + eps) from the norm's running statistics, and the norm passes its input on. A frozen
    backbone's norms use their running statistics, so the maps are the same up to rounding, without a pass over
    every map for each norm (the saving is measured in `docs/benchmarks.md`)."""
    pairs = _convolution_norm_pairs(backbone)
    for convolution_name, norm_name in pairs:
        norm = NormFoldedIntoConvolution.taking_over(backbone.get_submodule(norm_name))
        convolution = ConvolutionWithFoldedNorm.taking_over(backbone.get_submodule(convolution_name), norm)
        backbone.set_submodule(norm_name, norm)
        backbone.set_submodule(convolution_name, convolution)
    return len(pairs)


def _convolution_norm_pairs(backbone: nn.Module) -> list[tuple[str, str]]:
    """The names of the (Conv2d, BatchNorm2d) pairs where, in one pass of a blank image, the norm's input is the
    convolution's output and nothing else reads that output, each module running once. The pass is watched with
    hooks on these modules and a torch function mode, which is local to this thread; not traced with torch.fx, which
    patches `nn.Module.__call__` for the whole process while it traces and so breaks models other threads run. A
    backbone that cannot run the blank image, or without such pairs (ViTs, Swin, ConvNeXt, EfficientNet's fused
    norm-activation layers), keeps all its norms."""
    names = {module: name for name, module in backbone.named_modules()}
    watched = [
        module
        for module in names
        if not (module._forward_hooks or module._forward_pre_hooks)
        and (type(module) is nn.Conv2d or (type(module) is nn.BatchNorm2d and module.affine))
    ]
    if not any(isinstance(module, nn.BatchNorm2d) for module in watched):
        return []
    watcher = _ReadWatcher()
    calls: Counter = Counter()
    input_of: dict[nn.Module, nn.Module | None] = {}  # norm -> the convolution whose output it took

    def before_call(module: nn.Module, args: tuple) -> None:
        calls[module] += 1
        if isinstance(module, nn.BatchNorm2d):
            input_of[module] = watcher.made_by.get(id(args[0]))
            watcher.reader = module

    def after_call(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            watcher.watch(output, module)
        watcher.reader = None

    handles = [module.register_forward_pre_hook(before_call) for module in watched]
    handles += [module.register_forward_hook(after_call) for module in watched]
    parameter = next(backbone.parameters())
    timm_config = getattr(backbone, "pretrained_cfg", None) or {}
    size = timm_config["input_size"] if timm_config.get("fixed_input_size") else (3, 128, 128)
    try:
        with torch.no_grad(), watcher:
            outputs = backbone(torch.zeros(1, *size, device=parameter.device, dtype=parameter.dtype))
    except Exception:  # folding is an optimisation: a backbone that cannot run this pass keeps its norms
        return []
    finally:
        for handle in handles:
            handle.remove()
    for output in torch.utils._pytree.tree_leaves(outputs):  # a map the backbone returns is read by its caller
        watcher.read(output)
    return [
        (names[convolution], names[norm])
        for norm, convolution in input_of.items()
        if convolution is not None
        and calls[norm] == calls[convolution] == 1
        and watcher.readers[convolution] == {norm}
    ]


class _ReadWatcher(TorchFunctionMode):
    """Records which modules read each watched convolution output: the norm running at the time (`reader`), or None
    outside every norm."""

    def __init__(self):
        super().__init__()
        self.reader: nn.Module | None = None
        self.made_by: dict[int, nn.Module] = {}  # id of a watched output -> the convolution that made it
        self.readers: defaultdict[nn.Module, set] = defaultdict(set)
        self._outputs: list[torch.Tensor] = []  # kept alive, so that no other tensor takes their ids

    def watch(self, output: torch.Tensor, convolution: nn.Module) -> None:
        self._outputs.append(output)
        self.made_by[id(output)] = convolution

    def read(self, value: object) -> None:
        if isinstance(value, torch.Tensor) and id(value) in self.made_by:
            self.readers[self.made_by[id(value)]].add(self.reader)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        for value in torch.utils._pytree.tree_leaves((args, kwargs or {})):
            self.read(value)
        return func(*args, **(kwargs or {}))


class NormFoldedIntoConvolution(nn.BatchNorm2d):
    """A BatchNorm2d whose affine map is applied by the convolution before it (`ConvolutionWithFoldedNorm`): it
    keeps its parameters and statistics and passes its input on."""

    @classmethod
    def taking_over(cls, norm: nn.BatchNorm2d) -> "NormFoldedIntoConvolution":
        """The folded norm with `norm`'s parameters, buffers and marks (built on the meta device: nothing is copied)."""
        folded = cls(norm.num_features, eps=norm.eps, momentum=norm.momentum, device="meta")
        folded.weight, folded.bias = norm.weight, norm.bias
        folded.running_mean, folded.running_var = norm.running_mean, norm.running_var
        folded.num_batches_tracked = norm.num_batches_tracked
        folded.zero_init_weight = getattr(norm, "zero_init_weight", False)
        return folded.train(norm.training)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs


class ConvolutionWithFoldedNorm(nn.Conv2d):
    """A Conv2d followed by its BatchNorm (running statistics) as one convolution. The norm stays a module of the
    backbone (a `NormFoldedIntoConvolution`, which owns its parameters); this one only reads it."""

    @classmethod
    def taking_over(cls, convolution: nn.Conv2d, norm: NormFoldedIntoConvolution) -> "ConvolutionWithFoldedNorm":
        """The folded convolution with `convolution`'s parameters (built on the meta device: nothing is copied)."""
        folded = cls(
            convolution.in_channels,
            convolution.out_channels,
            convolution.kernel_size,
            stride=convolution.stride,
            padding=convolution.padding,
            dilation=convolution.dilation,
            groups=convolution.groups,
            bias=convolution.bias is not None,
            padding_mode=convolution.padding_mode,
            device="meta",
        )
        folded.weight, folded.bias = convolution.weight, convolution.bias
        # Not a submodule: the norm is registered where it stands in the backbone, and would otherwise be saved twice.
        folded.__dict__["folded_norm"] = norm
        return folded.train(convolution.training)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        # The scaled weight is made for this call only (scaling every weight once would hold a second copy of the
        # backbone).
        scale, bias = _norm_as_affine(self, self.folded_norm)
        return self._conv_forward(inputs, self.weight * scale, bias)


def _norm_as_affine(convolution: nn.Conv2d, norm: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The (C, 1, 1, 1) scale of the convolution's weight and the (C,) bias that make convolution then norm (running
    statistics) one convolution: computed in float32, given in the convolution's dtype."""
    scale = norm.weight.float() * torch.rsqrt(norm.running_var.float() + norm.eps)
    bias = norm.bias.float() - norm.running_mean.float() * scale
    if convolution.bias is not None:
        bias = bias + convolution.bias.float() * scale
    dtype = convolution.weight.dtype
    return scale.view(-1, 1, 1, 1).to(dtype), bias.to(dtype)


# The visual prefix as the authors' released HVPNeT code computes it (`prefix_mode="original"`).
#
# That code (which produced the paper's Table 1) differs from the paper's text. It is kept as its own class, apart
# from the paper mode, so that checkpoints trained with it can be converted (`convert_original_checkpoint.py`) and
# give the same outputs. What it does, per image:
#
# 1. Average-pool every backbone stage with `AvgPool2d(k, stride=k)`, `k = size // g` (a 7x7 map gets k=3: a 2x2
#    grid over its top-left 6x6 corner), concatenate the pooled maps on channels: (C, g, g).
# 2. Reinterpret that memory with a raw view as g*g tokens of C features (not a transpose).
# 3. `encoder_conv`: Linear(C, 800) -> Tanh -> Linear(800, c * 2d), split into c chunks of 2d: the gate's "stages".
# 4. For layer l: gate = softmax(leaky_relu(W_l(mean of the chunks, flattened))), gated sum of the chunks: (g*g, 2d).
# 5. Concatenate the images of an example on the token axis, split key (first d) and value (last d), and turn each
#    (P, d) into heads with a raw reshape to (H, P, h) (again not a transpose).
#
# Absent images are all-zero images that are still gated and attended, as in that code: unlike the paper mode, a
# masked image is not the same as no image. Only a forward without any pixel values is text-only.
#
# Shapes: B = batch, n = images per example, N = B * n, L = text layers, c = chunks (one per backbone stage),
# g = prefix grid side, t = g * g tokens per image, P = n * t, d = hidden size, H = heads, h = head size.

# Width of the hidden layer of the original `encoder_conv` MLP.
ORIGINAL_MLP_HIDDEN_SIZE = 800


class HVPNetOriginalVisualPrefixEncoder(HVPNetVisionEncoderBase):
    """Images → per-layer visual prefix in the layout of the authors' code, for all images in batched backbone calls.

    Module names follow that code (`encoder_conv`, one linear `gate` holding its L `gates`) so that its checkpoints
    map key by key.
    """

    def __init__(self, config: HVPNetConfig):
        super().__init__(config)
        reductions = self.backbone.feature_info.reduction()
        if self.maps_channels_last or len(set(reductions)) < len(reductions):
            layout = "channels-last maps" if self.maps_channels_last else "several levels of one resolution"
            raise ValueError(
                "prefix_mode='original' reproduces the authors' code, which pools the stage pyramid of a ResNet-50 "
                f"(channels first, one resolution per stage); vision_backbone {config.vision_backbone!r} gives "
                f"{layout}. Use prefix_mode='pyramid' with it."
            )
        self.num_stages = len(self.backbone.feature_info.channels())
        tokens = self.grid**2
        self.encoder_conv = nn.Sequential(
            nn.Linear(sum(self.backbone.feature_info.channels()), ORIGINAL_MLP_HIDDEN_SIZE),
            nn.Tanh(),
            nn.Linear(ORIGINAL_MLP_HIDDEN_SIZE, self.num_stages * 2 * self.hidden_size),
        )
        # The original's L gate layers Linear(t * 2d, c), stacked as one layer t * 2d -> L * c.
        self.gate = nn.Linear(tokens * 2 * self.hidden_size, self.num_layers * self.num_stages)

    def pool_feature_maps(self, feature_maps: list[torch.Tensor]) -> torch.Tensor:
        """(N, t, C): every stage pooled to g x g, concatenated on channels, raw-viewed."""
        pooled = []
        for stage, feature_map in enumerate(feature_maps):
            kernel = feature_map.shape[-2] // self.grid  # from the map's height, as in the original
            grid = nn.functional.avg_pool2d(feature_map, kernel_size=kernel, stride=kernel) if kernel > 0 else None
            if grid is None or grid.shape[-2:] != (self.grid, self.grid):
                raise ValueError(
                    f"prefix_mode='original' pools backbone stage {stage} (a {tuple(feature_map.shape[-2:])} map) "
                    f"with kernel height // prefix_grid, which does not give a {self.grid}x{self.grid} grid; use "
                    "square images large enough (the original code uses 224x224)"
                )
            pooled.append(grid)
        channels_first = torch.cat(pooled, dim=1).contiguous()  # (N, C, g, g)
        return channels_first.view(channels_first.shape[0], self.grid**2, -1)

    def forward(self, images: torch.Tensor, present: torch.Tensor) -> VisualPrefix:
        """images (B, n, 3, H, W) global image first, then object crops; present (B, n) bool.

        Absent images are replaced by zero images and, like every other image, attended.
        """
        present = present.to(device=images.device, dtype=torch.bool)
        images = images.masked_fill(~present[:, :, None, None, None], 0.0)
        features = self.visual_features(images.flatten(0, 1))
        return self.prefix_from_features(features.view(*present.shape, *features.shape[1:]), present)

    def prefix_from_features(self, features: torch.Tensor, present: torch.Tensor) -> VisualPrefix:
        """features (B, n, t, C) from `visual_features`; present (B, n). An absent image must hold the features of
        a zero image (what `forward` and the feature cache give it): it is attended like any other."""
        batch_size, num_images = present.shape
        features = features.flatten(0, 1).to(self.gate.weight.dtype)  # to the layers' dtype
        chunks = self.encoder_conv(features)
        chunks = chunks.view(features.shape[0], self.grid**2, self.num_stages, 2 * self.hidden_size)  # (N, t, c, 2d)
        gate_logits = self.gate(chunks.mean(dim=2).flatten(1)).view(-1, self.num_layers, self.num_stages)
        gate_weights = nn.functional.leaky_relu(gate_logits).float().softmax(dim=-1).to(chunks.dtype)  # (N, L, c)
        gated = torch.einsum("nlc,ntcd->nltd", gate_weights, chunks)  # (N, L, t, 2d)

        # Images of one example side by side on the token axis: (B, L, P, 2d).
        prefix = gated.view(batch_size, num_images, self.num_layers, -1, 2 * self.hidden_size).transpose(1, 2)
        prefix = prefix.flatten(2, 3)
        num_tokens = prefix.shape[2]

        def to_heads(states: torch.Tensor) -> tuple[torch.Tensor, ...]:
            """(B, L, P, d) → L tensors (B, H, P, h) by the original's raw reshape of each layer's (P, d) memory."""
            states = states.contiguous().view(batch_size, self.num_layers, self.num_heads, num_tokens, -1)
            return states.unbind(1)

        return VisualPrefix(
            keys=to_heads(prefix[..., : self.hidden_size]),
            values=to_heads(prefix[..., self.hidden_size :]),
            mask=present.new_ones(batch_size, num_tokens),
            gate_weights=gate_weights.view(batch_size, num_images, self.num_layers, self.num_stages),
        )


class HVPNetPreTrainedModel(PreTrainedModel):
    config_class = HVPNetConfig
    config: HVPNetConfig
    base_model_prefix = "hvpnet"
    main_input_name = "input_ids"
    input_modalities = ("text", "image")
    supports_gradient_checkpointing = True
    # The prefix extends the additive (eager) or boolean (sdpa) mask the text model builds; flash and flex attention
    # take other mask forms and are not supported.
    _supports_sdpa = True
    # No `_no_split_modules` of its own: `post_init` collects the text model's (its embeddings and layers).
    # The heads average their losses over the batch themselves; Trainer must not expect `num_items_in_batch` use.
    accepts_loss_kwargs = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """transformers' initialisation, except for the CNN backbone, which gets timm's ResNet initialisation (N(0,
        0.02) convolutions would leave a random CNN with vanishing activations): He-normal convolutions, BatchNorms
        reset to the identity, the last one of each residual block with a zero weight. Weights loaded from a
        checkpoint are left alone (transformers guards `init`)."""
        super()._init_weights(module)
        if isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif getattr(module, "zero_init_weight", False):
            init.zeros_(module.weight)
        elif isinstance(module, HVPNetVisualPrefixEncoder) and module.prefix_mode != "pyramid":
            init.copy_(module.fixed_gate, module._fixed_gate(module.num_stages))

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """`PreTrainedModel.save_pretrained`, which also records a task model's pipeline and copies its code (see
        `pipelines.save_pipeline_code`). `push_to_hub`, `Trainer.save_model` and `Trainer.push_to_hub` save through
        it, so every saved task model loads with `pipeline(model=..., trust_remote_code=True)` once its processor is
        saved next to it."""
        # Imported here: using a model should not load the pipelines (transformers' pipelines, torchvision) first.
        from .pipelines import TASK_OF_MODEL, save_pipeline_code

        if type(self).__name__ in TASK_OF_MODEL and kwargs.get("is_main_process", True):
            save_pipeline_code(self, save_directory)
        super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def from_text_vision_pretrained(
        cls,
        text_model_name_or_path: str,
        vision_backbone: str = "resnet50",
        vision_pretrained: bool | str = False,
        processor=None,
        **config_kwargs,
    ) -> "HVPNetPreTrainedModel":
        """Build an HVPNeT model around a pretrained text encoder of a supported family (its type is read from the
        checkpoint's config) and optionally pretrained backbone weights.

        `vision_pretrained`: False (random backbone), True (timm's pretrained weights) or a local checkpoint path.
        `processor`: an `HVPNetProcessor`; when given, the embeddings are resized to `len(processor.tokenizer)` and,
        for a relation processor, the marker ids are its `head_start_token_id` and `tail_start_token_id`.
        `config_kwargs`: settings of `HVPNetConfig` (and `num_labels`, `id2label`, ... of every config); any other
        keyword is an error, before anything is loaded.
        """
        _check_config_kwargs(config_kwargs)
        text_config = AutoConfig.from_pretrained(text_model_name_or_path)
        tokenizer = processor.tokenizer if processor is not None else None
        if processor is not None and processor.task == "re":
            config_kwargs.setdefault("head_start_token_id", processor.head_start_token_id)
            config_kwargs.setdefault("tail_start_token_id", processor.tail_start_token_id)
        config = HVPNetConfig(
            text_config=text_config,
            vision_backbone=vision_backbone,
            vision_pretrained=bool(vision_pretrained),
            **config_kwargs,
        )
        model = cls(config)
        base = model if isinstance(model, HVPNetModel) else model.hvpnet
        text_model_class, _ = TEXT_MODELS[text_config.model_type]
        pretrained_text = text_model_class.from_pretrained(text_model_name_or_path).state_dict()
        if getattr(base.text_model, "pooler", None) is None:  # the task heads read token states, not the pooler
            pretrained_text = {
                name: weight for name, weight in pretrained_text.items() if not name.startswith("pooler.")
            }
        base.text_model.load_state_dict(pretrained_text)
        if vision_pretrained and base.visual_encoder is not None:
            base.visual_encoder.load_pretrained_backbone(vision_pretrained, config)
        if tokenizer is not None and len(tokenizer) != text_config.vocab_size:
            model.resize_token_embeddings(len(tokenizer))
        return model


def _check_config_kwargs(config_kwargs: dict) -> None:
    """Refuse keywords of `from_text_vision_pretrained` that no configuration reads. `PreTrainedConfig` keeps unknown
    keys as attributes (for configs written by other versions), so a misspelt setting would otherwise build the
    model with the default in its place."""
    builder_arguments = {"text_model_name_or_path", "vision_backbone", "vision_pretrained", "processor"}
    known = {name for name in inspect.signature(HVPNetConfig.__init__).parameters if name not in ("self", "kwargs")}
    known |= {item.name for item in fields(PreTrainedConfig)} | {"num_labels"}
    known -= builder_arguments | {"text_config"}
    unknown = sorted(set(config_kwargs) - known)
    if unknown:
        hints = [
            f"{name!r} (did you mean {close[0]!r}?)" if (close := get_close_matches(name, known, n=1)) else repr(name)
            for name in unknown
        ]
        raise TypeError(
            f"from_text_vision_pretrained got unknown settings {', '.join(hints)}; it takes the arguments {sorted(builder_arguments)} and the settings of HVPNetConfig"
        )


class HVPNetModel(HVPNetPreTrainedModel):
    """The HVPNeT encoder: a BERT-family text encoder with a visual prefix in every self-attention layer.

    Its text encoder is the family's own model (`BertModel`, `RobertaModel`, `XLMRobertaModel`, `ElectraModel`, ...,
    see `TEXT_MODELS`) whose self-attention modules are the prefix attention, so the family's pretrained weights load
    into it unchanged and its embeddings keep their conventions (RoBERTa's positions after the padding index,
    ELECTRA's embedding projection). `forward` builds the visual prefix and runs that text model with it as the
    keyword argument `visual_prefix`, which transformers hands down to every self-attention module; hidden states and
    attention weights are recorded by transformers as for the text model. With `use_visual_prefix=False`, or when
    every image is masked (paper modes), it computes exactly what the text model computes.
    """

    def __init__(self, config: HVPNetConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.text_model = build_text_model(config.text_config, add_pooling_layer)
        if not config.use_visual_prefix:
            self.visual_encoder = None
        elif config.prefix_mode == "original":
            self.visual_encoder = HVPNetOriginalVisualPrefixEncoder(config)
        else:
            self.visual_encoder = HVPNetVisualPrefixEncoder(config)
        self.post_init()

    @property
    def max_text_length(self) -> int:
        """The longest text the position embeddings take: `max_position_embeddings`, less the positions that
        RoBERTa-style embeddings skip (they count from `padding_idx + 1`; 512 of RoBERTa's 514)."""
        positions = self.text_model.embeddings.position_embeddings
        return positions.num_embeddings - (0 if positions.padding_idx is None else positions.padding_idx + 1)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.text_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.text_model.set_input_embeddings(value)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_gate_weights: bool = False,
        image_features: torch.Tensor | None = None,
        image_features_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> HVPNetModelOutput:
        """
        input_ids, attention_mask, token_type_ids, position_ids: (B, T) as for BERT; text positions start at 0 (the
            prefix has no positions).
        pixel_values: (B, n, 3, H, W) the images of every example, the global image in slot 0 and the object crops
            after it, n <= 1 + num_object_images; missing slots count as absent.
        image_mask: (B, n) bool, False where an image is absent (its prefix tokens are masked out); all present
            when omitted.
        image_features: instead of pixels, (B, 1 + num_object_images, g*g, C) the frozen backbone's pooled features
            of the global image and the crops (`visual_features` of the encoder), as `VisualFeatureCache` serves them;
            image_features_mask: (B, 1 + num_object_images) bool, False where an image is absent.
        output_gate_weights: return the gate weights (B, n, L, c).
        `output_hidden_states`, `output_attentions` and `return_dict` work as for the text model (attention weights
        need `attn_implementation="eager"`).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds")
        _warn_if_bfloat16_is_emulated(self)
        batch_size = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        for flag in ("output_attentions", "output_hidden_states"):  # the text model would read its own config's
            kwargs.setdefault(flag, getattr(self.config, flag))
        if image_features is None:
            prefix = self.visual_prefix(pixel_values, image_mask, batch_size)
        elif pixel_values is not None or image_mask is not None:
            raise ValueError("Pass either pixel_values (with image_mask) or image_features, not both")
        else:
            prefix = self.visual_prefix_from_features(image_features, image_features_mask, batch_size)
        text_outputs = self.text_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            visual_prefix=prefix,
            return_dict=True,
            **kwargs,
        )
        return HVPNetModelOutput(
            last_hidden_state=text_outputs.last_hidden_state,
            pooler_output=getattr(text_outputs, "pooler_output", None),  # ELECTRA has no pooler
            hidden_states=text_outputs.hidden_states,
            attentions=text_outputs.attentions,
            gate_weights=prefix.gate_weights if output_gate_weights and prefix is not None else None,
        )

    def visual_prefix(
        self, pixel_values: torch.Tensor | None, image_mask: torch.Tensor | None, batch_size: int
    ) -> VisualPrefix | None:
        """The visual prefix of the image inputs of `forward`, or None when there are none to use."""
        if pixel_values is None:
            if image_mask is not None:
                raise ValueError("image_mask was given without pixel_values")
            return None
        present = _image_presence(pixel_values, image_mask, batch_size, self.config.num_object_images)
        if self.visual_encoder is None:
            return None
        images = pixel_values
        if not self.config.use_global_image:  # the paper's OnlyObj ablation
            images, present = images[:, 1:], present[:, 1:]
            if images.shape[1] == 0:
                return None
        missing = self.config.num_images - images.shape[1]
        if missing > 0:  # fewer crops than slots: pad with absent images
            images = torch.cat([images, images.new_zeros(batch_size, missing, *images.shape[2:])], dim=1)
            present = torch.cat([present, present.new_zeros(batch_size, missing)], dim=1)
        return self.visual_encoder(images, present)

    def visual_prefix_from_features(
        self, image_features: torch.Tensor, image_features_mask: torch.Tensor | None, batch_size: int
    ) -> VisualPrefix | None:
        """The prefix from cached backbone features (B, 1 + num_object_images, g*g, C), global image first."""
        if self.visual_encoder is None:
            return None
        num_slots = 1 + self.config.num_object_images
        if image_features.dim() != 4 or tuple(image_features.shape[:2]) != (batch_size, num_slots):
            raise ValueError(
                f"image_features must have shape (batch={batch_size}, 1 + num_object_images={num_slots}, tokens, "
                f"channels), got {tuple(image_features.shape)}"
            )
        present = _presence("image_features_mask", image_features_mask, image_features, batch_size)
        if not self.config.use_global_image:
            image_features, present = image_features[:, 1:], present[:, 1:]
        return self.visual_encoder.prefix_from_features(image_features, present)


@cache
def cpu_computes_bfloat16_natively() -> bool:
    """Whether this CPU has bfloat16 instructions (on x86, AVX512-BF16 or AMX). Without them torch emulates
    bfloat16, many times slower than float32: a training step at the paper's settings took 16x as long as in float32
    on an AVX2-only CPU (`benchmarks/bench_original.py`). Other architectures are taken to have them (torch has no
    check for them)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def _warn_if_bfloat16_is_emulated(model: nn.Module) -> None:
    """Warns once when `model` computes in bfloat16 (its weights or CPU autocast) on a CPU that emulates it. Called
    on every forward: on a CPU with bfloat16 instructions it returns after one cached check."""
    if torch.compiler.is_compiling() or cpu_computes_bfloat16_natively() or model.device.type != "cpu":
        return
    autocast = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    if autocast or model.dtype == torch.bfloat16:
        logger.warning_once(
            "This CPU has no bfloat16 instructions (AVX512-BF16 or AMX): torch emulates bfloat16 on it, many times "
            "slower than float32. Run in float32 here (no --bf16, dtype=torch.float32)."
        )


def _image_presence(
    pixel_values: torch.Tensor, image_mask: torch.Tensor | None, batch_size: int, num_object_images: int
) -> torch.Tensor:
    """Check the image inputs of `forward` and return which of their slots hold an image: (B, n) bool."""
    if pixel_values.dim() != 5 or pixel_values.shape[0] != batch_size or pixel_values.shape[2] != 3:
        raise ValueError(
            f"pixel_values must have shape (batch={batch_size}, num_images, 3, height, width), the global image in "
            f"slot 0 and the object crops after it, got {tuple(pixel_values.shape)}"
        )
    if pixel_values.shape[1] > 1 + num_object_images:
        raise ValueError(
            f"pixel_values holds {pixel_values.shape[1]} images per example (the global image and "
            f"{pixel_values.shape[1] - 1} object crops) but the model takes at most num_object_images="
            f"{num_object_images} crops"
        )
    return _presence("image_mask", image_mask, pixel_values, batch_size)


def _presence(name: str, mask: torch.Tensor | None, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(B, n) bool: which of the given image slots hold a real image (all of them without a mask)."""
    slots = (batch_size, images.shape[1])
    if mask is None:
        return torch.ones(slots, dtype=torch.bool, device=images.device)
    if tuple(mask.shape) != slots:
        raise ValueError(f"{name} must have shape {slots}, got {tuple(mask.shape)}")
    return mask.to(device=images.device, dtype=torch.bool)


def _word_positions(word_start_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """word_start_mask (B, T) bool → token index of every word (B, W) and a word mask (B, W), words left-aligned."""
    num_words = word_start_mask.sum(dim=1)
    # A stable sort puts the word-start positions first, in text order.
    order = torch.sort((~word_start_mask).to(torch.uint8), dim=1, stable=True).indices
    max_words = int(num_words.max()) if len(num_words) else 0
    word_mask = torch.arange(max_words, device=word_start_mask.device)[None, :] < num_words[:, None]
    return order[:, :max_words], word_mask


class HVPNetForTokenClassification(HVPNetPreTrainedModel):
    """HVPNeT with an emission layer and a CRF over words (paper §3.4), for multimodal NER.

    The CRF runs over the first sub-word of every word. Labels follow transformers' word-level convention: the tag id
    at a word's first sub-word and -100 on other sub-words, special tokens and padding.
    """

    # The CRF's sums of transition scores over a sentence stay in float32 in a bf16 or fp16 model.
    _keep_in_fp32_modules_strict = ["crf"]

    def __init__(self, config: HVPNetConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.hvpnet = HVPNetModel(config, add_pooling_layer=False)
        dropout = config.classifier_dropout
        self.dropout = nn.Dropout(dropout if dropout is not None else config.text_config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.text_config.hidden_size, config.num_labels)
        self.crf = CRF(config.num_labels, batch_first=True)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, CRF):
            for transitions in (module.start_transitions, module.end_transitions, module.transitions):
                init.uniform_(transitions, -0.1, 0.1)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        word_start_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_gate_weights: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> HVPNetTokenClassifierOutput:
        """
        word_start_mask: (B, T) bool, True at the first sub-word of every word; derived from `labels != -100`
            when omitted.
        labels: (B, T) tag ids at first sub-words, -100 elsewhere.
        """
        text_shape = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        if labels is not None and labels.shape != text_shape:
            raise ValueError(
                f"labels must have the text's shape {tuple(text_shape)} (one entry per token, -100 off first "
                f"sub-words), got {tuple(labels.shape)}"
            )
        if word_start_mask is None:
            if labels is None:
                raise ValueError("Pass word_start_mask (True at each word's first sub-word) or labels")
            word_start_mask = labels != -100
        word_start_mask = word_start_mask.bool()
        if attention_mask is not None:
            word_start_mask = word_start_mask & attention_mask.bool()
        if labels is not None and ((labels != -100) & ~word_start_mask).any():
            raise ValueError("labels hold a tag off a word start (where word_start_mask is False); use -100 there")

        outputs = self.hvpnet(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            pixel_values=pixel_values,
            image_mask=image_mask,
            inputs_embeds=inputs_embeds,
            output_gate_weights=output_gate_weights,
            return_dict=True,
            **kwargs,
        )
        emissions = self.classifier(self.dropout(outputs.last_hidden_state))

        word_index, word_mask = _word_positions(word_start_mask)
        # The CRF runs in float32, also when the model runs under bf16 / fp16 autocast.
        word_emissions = emissions.float().gather(1, word_index[..., None].expand(-1, -1, self.num_labels))
        # pytorch-crf needs every sequence to start with a real step: examples without words are left out.
        has_words = word_mask[:, 0] if word_mask.shape[1] else word_mask.new_zeros(len(word_mask))

        loss = None
        if labels is not None:
            word_labels = labels.gather(1, word_index)
            if ((word_labels < 0) & word_mask).any() or (word_labels >= self.num_labels).any():
                raise ValueError(f"labels at word starts must be tag ids in [0, {self.num_labels})")
            word_labels = word_labels.masked_fill(~word_mask, 0)
            if has_words.any():
                log_likelihood = self.crf(
                    word_emissions[has_words], word_labels[has_words], mask=word_mask[has_words], reduction="sum"
                )
                loss = -log_likelihood / len(labels)
            else:
                loss = emissions.sum() * 0.0

        predicted_tags = None
        if not self.training:
            predicted_tags = torch.full_like(word_start_mask, -100, dtype=torch.long)
            if has_words.any():
                paths = self.crf.decode(word_emissions[has_words], mask=word_mask[has_words])
                word_tags = torch.zeros_like(word_index[has_words])
                for row, path in enumerate(paths):
                    word_tags[row, : len(path)] = torch.tensor(path, device=word_tags.device)
                # Padded word slots point at non-word positions, which keep -100.
                decoded = torch.full_like(predicted_tags[has_words], -100)
                decoded.scatter_(1, word_index[has_words], word_tags.masked_fill(~word_mask[has_words], -100))
                predicted_tags[has_words] = decoded

        return HVPNetTokenClassifierOutput(
            loss=loss,
            logits=emissions,
            predicted_tags=predicted_tags,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            gate_weights=outputs.gate_weights,
        )


class HVPNetForSequenceClassification(HVPNetPreTrainedModel):
    """HVPNeT with a relation classifier (paper §3.4), for multimodal relation extraction.

    With `relation_pooling="entity_markers"` (default) the classifier reads the last hidden states at the head and
    tail start markers (`<s>`, `<o>`), concatenated; with `"cls"` it reads the `[CLS]` state.
    """

    def __init__(self, config: HVPNetConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.hvpnet = HVPNetModel(config, add_pooling_layer=False)
        dropout = config.classifier_dropout
        self.dropout = nn.Dropout(dropout if dropout is not None else config.text_config.hidden_dropout_prob)
        num_states = 2 if config.relation_pooling == "entity_markers" else 1
        self.classifier = nn.Linear(num_states * config.text_config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_gate_weights: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SequenceClassifierOutput:
        """
        inputs_embeds: (B, T, d) instead of input_ids; with `relation_pooling="entity_markers"` the markers are the
            positions whose embedding is exactly the marker token's row of the input embeddings.
        labels: by `config.problem_type`, as for `BertForSequenceClassification`: (B,) relation ids
            ("single_label_classification", the default for integer labels), (B, num_labels) 0/1 floats
            ("multi_label_classification": several relations per entity pair, the default for float labels), or
            (B,) / (B, num_labels) targets ("regression", the default with num_labels=1).
        """
        outputs = self.hvpnet(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            pixel_values=pixel_values,
            image_mask=image_mask,
            inputs_embeds=inputs_embeds,
            output_gate_weights=output_gate_weights,
            return_dict=True,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        if self.config.relation_pooling == "cls":
            features = hidden[:, 0]
        else:
            rows = torch.arange(len(hidden), device=hidden.device)
            head = self._marker_positions(input_ids, inputs_embeds, "head_start_token_id", "<s>")
            tail = self._marker_positions(input_ids, inputs_embeds, "tail_start_token_id", "<o>")
            features = torch.cat([hidden[rows, head], hidden[rows, tail]], dim=-1)
        logits = self.classifier(self.dropout(features))

        loss = None if labels is None else self._loss(logits.float(), labels)  # float32 also under autocast
        output = SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        if output_gate_weights:
            output["gate_weights"] = outputs.gate_weights
        return output

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss of `config.problem_type`, chosen from the labels when unset as `BertForSequenceClassification`
        chooses it."""
        problem_type = self.config.problem_type
        if problem_type is None:
            if self.num_labels == 1:
                problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem_type = "single_label_classification"
            else:
                problem_type = "multi_label_classification"
        batch_size = len(logits)
        if problem_type == "single_label_classification":
            if labels.shape != (batch_size,):
                raise ValueError(
                    f"labels must have shape ({batch_size},) (one relation id each), got {tuple(labels.shape)}"
                )
            return nn.functional.cross_entropy(logits, labels)
        if problem_type == "multi_label_classification":
            if labels.shape != logits.shape:
                raise ValueError(
                    f"multi-label labels must have shape {tuple(logits.shape)} (0/1 per relation), got {tuple(labels.shape)}"
                )
            return nn.functional.binary_cross_entropy_with_logits(logits, labels.float())
        if labels.shape not in ((batch_size,), tuple(logits.shape)) or (labels.dim() == 1 and self.num_labels != 1):
            raise ValueError(f"regression labels must have shape {tuple(logits.shape)}, got {tuple(labels.shape)}")
        return nn.functional.mse_loss(logits.view(labels.shape), labels.float())

    def _marker_positions(
        self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None, setting: str, token: str
    ) -> torch.Tensor:
        """(B,) position of the first marker `config.<setting>` in every row; a row without it is an error."""
        marker_id = getattr(self.config, setting)
        if marker_id is None:
            raise ValueError(f"config.{setting} is not set; take it from the processor's tokenizer ({token})")
        if input_ids is not None:
            is_marker = input_ids == marker_id
        else:
            marker_embedding = self.get_input_embeddings().weight[marker_id].to(inputs_embeds.dtype)
            is_marker = (inputs_embeds == marker_embedding).all(dim=-1)
        missing = (~is_marker.any(dim=1)).nonzero().flatten().tolist()
        if missing:
            found_by = "in input_ids" if input_ids is not None else "(by its embedding row) in inputs_embeds"
            raise ValueError(
                f"RE input rows {missing} lack the entity marker {setting} {token} = {marker_id} {found_by}"
            )
        return is_marker.int().argmax(dim=1)


__all__ = [
    "HVPNetForSequenceClassification",
    "HVPNetForTokenClassification",
    "HVPNetLayer",
    "HVPNetLayerMixin",
    "HVPNetModel",
    "HVPNetOriginalVisualPrefixEncoder",
    "HVPNetPreTrainedModel",
    "HVPNetSelfAttention",
    "HVPNetVisualPrefixEncoder",
]
