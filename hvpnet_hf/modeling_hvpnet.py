"""PyTorch HVPNeT: a BERT-family encoder whose self-attention layers also attend to a hierarchical visual prefix.

Chen et al., "Good Visual Guidance Makes A Better Extractor: Hierarchical Visual Prefix for Multimodal Entity and
Relation Extraction", NAACL 2022 Findings. Section numbers in comments refer to that paper, and the file follows
its order: the visual prefix (§3.1-3.3, eq. 1-6 and 8), the prefix attention (eq. 7 and 9) in the text encoder's
layers, the encoder, and the NER and RE heads (§3.4). The backbone the prefix reads (`vision_backbone.py`) and the
prefix in the layout of the authors' code (`original_visual_prefix.py`) have modules of their own.

Shapes: B = batch, T = text length, n = images per example (global image + object crops), L = text layers,
c = backbone stages, g = prefix grid side, P = n * g * g prefix tokens, d = hidden size, H = heads, h = head size.
"""

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from difflib import get_close_matches
from functools import partial
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchcrf import CRF
from transformers import MODEL_MAPPING, AutoConfig, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import ModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.bert.modeling_bert import BertSelfAttention, eager_attention_forward
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, logging
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import install_output_capuring_hook

from .configuration_hvpnet import HVPNetConfig
from .original_visual_prefix import HVPNetOriginalVisualPrefixEncoder
from .tasks import TASK_OF_MODEL, bio_entities, save_pipeline_code
from .vision_backbone import HVPNetVisionEncoderBase, VisualPrefix

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
    logits: (B, T, num_labels) emission scores; `HVPNetForTokenClassification.decode` turns them into tags.
    hidden_states, attentions, gate_weights: as in `HVPNetModelOutput`.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    gate_weights: torch.FloatTensor | None = None


@dataclass
class HVPNetGroundedTokenClassifierOutput(ModelOutput):
    """
    loss: the CRF loss (given `labels`) plus the region loss (given `region_labels`), each averaged as its own.
    logits: (B, T, num_labels) emission scores, as in `HVPNetTokenClassifierOutput`.
    region_logits: (B, E, K + 1) scores of every entity of `entity_spans` for the K = num_object_images candidates
        (the object crop slots, in order), then "none"; absent candidates and padded entities hold the dtype's
        minimum. A softmax gives the region distribution.
    last_hidden_state: (B, T, d) text states of the last layer, which entity representations are read from.
    candidate_embeddings: (B, K, d) every candidate's own visual features projected to the text width.
    candidate_mask: (B, K) bool, True where a candidate crop is present.
    hidden_states, attentions, gate_weights: as in `HVPNetModelOutput`.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    region_logits: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    candidate_embeddings: torch.FloatTensor | None = None
    candidate_mask: torch.BoolTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    gate_weights: torch.FloatTensor | None = None


@dataclass
class HVPNetSequenceClassifierOutput(ModelOutput):
    """
    loss: the loss of `config.problem_type`, when `labels` are given.
    logits: (B, num_labels) relation scores; `HVPNetForSequenceClassification.decode` ranks the relations.
    hidden_states, attentions, gate_weights: as in `HVPNetModelOutput`.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    gate_weights: torch.FloatTensor | None = None


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
        # Eq. 8: the L key/value projections W_l^phi (d -> 2d), one module per layer, each with a gradient of its
        # own (a stacked (L, 2d, d) weight costs memory in training: `docs/benchmarks.md`). Built without the
        # constructor's random draws, which `_init_weights` would overwrite.
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
        return self.prefix_from_features(self.slot_features(images, present), present)

    def slot_features(self, images: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """images (B, n, 3, H, W), present (B, n) bool → (B, n, g*g, C) the pooled backbone features of every image
        slot (`visual_features`); rows of absent images are zeros, or their pixels' features in a compiled graph."""
        if torch.compiler.is_compiling() and not self.backbone.training:
            # A compiled or exported graph cannot branch on the mask or index by it: every image goes through the
            # backbone and `prefix_from_features` masks out the absent ones. With BatchNorm's running statistics
            # (eval mode) each image is encoded on its own, so the prefix is the same as below.
            features = self.visual_features(images.flatten(0, 1))
            return features.view(*present.shape, *features.shape[1:])
        # Eager PyTorch skips absent images before the backbone (faster: `docs/benchmarks.md`), and in training a
        # trainable backbone's batch statistics see only real images.
        flat_present, flat_images = present.flatten(), images.flatten(0, 1)
        if flat_present.all():  # nothing to skip: no copy of the pixels and no scatter
            features = self.visual_features(flat_images)
        else:
            features = images.new_zeros(flat_present.numel(), self.grid**2, sum(self.stage_channels))
            if flat_present.any():  # autocast may give lower-precision features
                features[flat_present] = self.visual_features(flat_images[flat_present]).to(features.dtype)
        return features.view(*present.shape, *features.shape[1:])

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


class HVPNetSelfAttention(BertSelfAttention):
    """BERT self-attention whose keys and values are prefixed by its layer's visual prefix (paper eq. 9).

    `HVPNetModel` hands the prefix of all layers down through the text model as the keyword argument
    `visual_prefix`; the attention of layer `layer_idx` prepends that layer's keys and values to the text's, and the
    prefix columns to the text mask that the text model built. Queries stay text-only, so the output keeps the text
    length.
    """

    @classmethod
    def from_family_attention(cls, attention: nn.Module) -> "HVPNetSelfAttention":
        """The prefix attention on the projections and dropout of `attention`, the self-attention module a supported
        family built (it has BERT's modules, names and sizes): the same weights under the same names."""
        with torch.device("meta"):  # the projections BERT's constructor builds are replaced: allocate none
            prefix_attention = cls(attention.config, is_causal=attention.is_causal, layer_idx=attention.layer_idx)
        for name in ("query", "key", "value", "dropout"):
            setattr(prefix_attention, name, getattr(attention, name))
        return prefix_attention

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
            key = torch.cat([visual_prefix.keys[self.layer_idx].to(key.dtype), key], dim=2)
            value = torch.cat([visual_prefix.values[self.layer_idx].to(value.dtype), value], dim=2)
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


def build_text_model(text_config: PreTrainedConfig, add_pooling_layer: bool) -> PreTrainedModel:
    """The family's own text model for `text_config` (the class `AutoModel` builds for its type), with the prefix
    attention in place of every self-attention module, on the same weights (ELECTRA has no pooler, whatever
    `add_pooling_layer` says)."""
    pooling = {} if text_config.model_type == "electra" else {"add_pooling_layer": add_pooling_layer}
    text_model = MODEL_MAPPING[type(text_config)](text_config, **pooling)
    # transformers records attention weights with a hook on the modules of the class the family's model names in
    # `_can_record_outputs`: its own self-attention class, of which only BERT's prefix attention is an instance.
    recorded_class = text_model._can_record_outputs["attentions"]
    for layer in text_model.encoder.layer:
        layer.attention.self = HVPNetSelfAttention.from_family_attention(layer.attention.self)
        if not isinstance(layer.attention.self, recorded_class):
            install_output_capuring_hook(layer.attention.self, "attentions", index=1)
    return text_model


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
        """transformers' initialization, except for the CNN backbone, which gets timm's ResNet initialization (N(0,
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
        `tasks.save_pipeline_code`). `push_to_hub`, `Trainer.save_model` and `Trainer.push_to_hub` save through
        it, so every saved task model loads with `pipeline(model=..., trust_remote_code=True)` once its processor is
        saved next to it."""
        if type(self).__name__ in TASK_OF_MODEL and kwargs.get("is_main_process", True):
            save_pipeline_code(self, save_directory)
        super().save_pretrained(save_directory, *args, **kwargs)

    def _set_gradient_checkpointing(
        self, enable: bool = True, gradient_checkpointing_func: Callable = checkpoint, every_n_layers: int = 1
    ) -> None:
        """transformers' installation of `gradient_checkpointing_func` on every text layer, wrapped so that it gets
        the visual prefix as positional inputs (`checkpoint_with_visual_prefix`)."""
        gradient_checkpointing_func = partial(checkpoint_with_visual_prefix, gradient_checkpointing_func)
        super()._set_gradient_checkpointing(enable, gradient_checkpointing_func, every_n_layers)

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
        pretrained_text = MODEL_MAPPING[type(text_config)].from_pretrained(text_model_name_or_path).state_dict()
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


class HVPNetModel(HVPNetPreTrainedModel):
    """The HVPNeT encoder: a BERT-family text encoder with a visual prefix in every self-attention layer.

    Its text encoder is the family's own model (`BertModel`, `RobertaModel`, `XLMRobertaModel`, `ElectraModel`, ...:
    the class `AutoModel` builds for `config.text_config`) with the prefix attention in place of its self-attention
    modules, on their weights (`build_text_model`), so the family's pretrained weights load into it unchanged and
    its embeddings keep their conventions (RoBERTa's positions after the padding index, ELECTRA's embedding
    projection). `forward` builds the visual prefix and runs that text model with it as the keyword argument
    `visual_prefix`, which transformers hands down to every self-attention module; hidden states and attention
    weights are recorded by transformers as for the text model. With `use_visual_prefix=False`, or when
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
        return self.visual_encoder(*_pad_slots(images, present, self.config.num_images))

    def slot_features(
        self, pixel_values: torch.Tensor, image_mask: torch.Tensor | None, batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The image inputs of `forward` as `image_features` (B, 1 + num_object_images, g*g, C), the pooled backbone
        features of the global image and of every crop slot (zeros for absent ones), and `image_features_mask`
        (B, 1 + num_object_images): `forward` builds the same prefix from them as from the pixels."""
        present = _image_presence(pixel_values, image_mask, batch_size, self.config.num_object_images)
        images, present = _pad_slots(pixel_values, present, 1 + self.config.num_object_images)
        return self.visual_encoder.slot_features(images, present), present

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


def _word_positions(word_start_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """word_start_mask (B, T) bool → token index of every word (B, W) and a word mask (B, W), words left-aligned."""
    num_words = word_start_mask.sum(dim=1)
    # A stable sort puts the word-start positions first, in text order.
    order = torch.sort((~word_start_mask).to(torch.uint8), dim=1, stable=True).indices
    max_words = int(num_words.max()) if len(num_words) else 0
    word_mask = torch.arange(max_words, device=word_start_mask.device)[None, :] < num_words[:, None]
    return order[:, :max_words], word_mask


def viterbi_decode(
    emissions: torch.Tensor,
    word_start_mask: torch.Tensor,
    start_transitions: torch.Tensor,
    end_transitions: torch.Tensor,
    transitions: torch.Tensor,
) -> torch.LongTensor:
    """
    The CRF's most likely tags of the words of every row (paper §3.4), all rows at once, in float32.

    emissions: (B, T, K) emission scores; word_start_mask: (B, T) bool, True at the first sub-word of every word
    (False on padding); start_transitions, end_transitions (K,) and transitions (K, K): the CRF's scores.
    Returns (B, T): the tag id of every word at its first sub-word and -100 elsewhere (a row without words is all
    -100), the path `torchcrf.CRF.decode` finds.
    """
    if emissions.dim() != 3 or word_start_mask.shape != emissions.shape[:2] or emissions.shape[2] != len(transitions):
        raise ValueError(
            f"decoding needs emissions (batch, tokens, {len(transitions)} tags) and a word_start_mask (batch, tokens) "
            f"of the same text, got {tuple(emissions.shape)} and {tuple(word_start_mask.shape)}"
        )
    tags = torch.full(word_start_mask.shape, -100, dtype=torch.long, device=emissions.device)
    word_index, word_mask = _word_positions(word_start_mask)
    if word_index.shape[1] == 0:
        return tags
    num_tags = emissions.shape[-1]
    scores = emissions.float().gather(1, word_index[..., None].expand(-1, -1, num_tags))  # (B, W, K)
    best = start_transitions.float() + scores[:, 0]  # (B, K): the best score of a path ending in each tag
    stay = torch.arange(num_tags, device=emissions.device).expand_as(best)
    backpointers = []
    for step in range(1, scores.shape[1]):
        step_best, previous = (best[:, :, None] + transitions.float() + scores[:, step, None, :]).max(dim=1)
        is_word = word_mask[:, step, None]
        best = torch.where(is_word, step_best, best)
        # Past its last word a row's path keeps its tag, so every row is traced back from the last step.
        backpointers.append(torch.where(is_word, previous, stay))
    current = (best + end_transitions.float()).max(dim=1).indices
    path = [current]
    for previous in reversed(backpointers):
        current = previous.gather(1, current[:, None])[:, 0]
        path.append(current)
    word_tags = torch.stack(path[::-1], dim=1).masked_fill(~word_mask, -100)
    # Padded word slots point at positions that are not word starts: they keep -100.
    return tags.scatter_(1, word_index, word_tags)


class HVPNetForTokenClassification(HVPNetPreTrainedModel):
    """HVPNeT with an emission layer and a CRF over words (paper §3.4), for multimodal NER.

    The CRF runs over the first sub-word of every word. Labels follow transformers' word-level convention: the tag id
    at a word's first sub-word and -100 on other sub-words, special tokens and padding. `forward` returns the
    emission scores (and the CRF loss given labels), in training and eval mode alike; `decode` gives the CRF's tags.
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
        # Created in float32 whatever the default dtype is, as `_keep_in_fp32_modules_strict` asks.
        self.crf = CRF(config.num_labels, batch_first=True).float()
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
        word_start_mask: (B, T) bool, True at the first sub-word of every word: where the CRF loss reads `labels`;
            derived from `labels != -100` when omitted.
        labels: (B, T) tag ids at first sub-words, -100 elsewhere.
        """
        if labels is not None:
            text_shape = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
            word_start_mask = self._labeled_word_starts(labels, word_start_mask, attention_mask, text_shape)
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
        loss = None if labels is None else self._crf_loss(emissions, labels, word_start_mask)
        return HVPNetTokenClassifierOutput(
            loss=loss,
            logits=emissions,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            gate_weights=outputs.gate_weights,
        )

    def _labeled_word_starts(
        self,
        labels: torch.Tensor,
        word_start_mask: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        text_shape: torch.Size,
    ) -> torch.Tensor:
        """(B, T) bool: the word starts where the loss reads `labels`, checked against them."""
        if labels.shape != text_shape:
            raise ValueError(
                f"labels must have the text's shape {tuple(text_shape)} (one entry per token, -100 off first "
                f"sub-words), got {tuple(labels.shape)}"
            )
        word_start_mask = labels != -100 if word_start_mask is None else word_start_mask.bool()
        if attention_mask is not None:
            word_start_mask = word_start_mask & attention_mask.bool()
        if ((labels != -100) & ~word_start_mask).any():
            raise ValueError("labels hold a tag off a word start (where word_start_mask is False); use -100 there")
        word_labels = labels[word_start_mask]
        if (word_labels < 0).any() or (word_labels >= self.num_labels).any():
            raise ValueError(f"labels at word starts must be tag ids in [0, {self.num_labels})")
        return word_start_mask

    def _crf_loss(self, emissions: torch.Tensor, labels: torch.Tensor, word_start_mask: torch.Tensor) -> torch.Tensor:
        """The CRF's negative log-likelihood of the word tags `labels` (B, T), averaged over the batch."""
        word_index, word_mask = _word_positions(word_start_mask)
        word_labels = labels.gather(1, word_index)
        # pytorch-crf needs every sequence to start with a real step: examples without words are left out.
        has_words = word_mask[:, 0] if word_mask.shape[1] else word_mask.new_zeros(len(word_mask))
        if not has_words.any():
            return emissions.sum() * 0.0
        # The CRF runs in float32, also when the model runs under bf16 / fp16 autocast.
        word_emissions = emissions.float().gather(1, word_index[..., None].expand(-1, -1, self.num_labels))
        log_likelihood = self.crf(
            word_emissions[has_words],
            word_labels.masked_fill(~word_mask, 0)[has_words],
            mask=word_mask[has_words],
            reduction="sum",
        )
        return -log_likelihood / len(labels)

    @torch.no_grad()
    def decode(self, logits: torch.Tensor, word_start_mask: torch.Tensor) -> torch.LongTensor:
        """(B, T) the CRF's tag ids of the words (`viterbi_decode`) for emission scores `logits` (B, T, num_labels),
        at the first sub-words that `word_start_mask` (B, T) marks and -100 elsewhere."""
        crf = self.crf
        return viterbi_decode(
            logits, word_start_mask.bool(), crf.start_transitions, crf.end_transitions, crf.transitions
        )


class HVPNetForGroundedTokenClassification(HVPNetForTokenClassification):
    """HVPNeT for grounded multimodal NER (Yu et al., ACL 2023): the NER head (emissions and CRF, inherited) and a
    region scorer that gives every entity a distribution over the candidate regions and "none".

    The candidates are the object crop slots (K = `config.num_object_images`, slot k + 1 is candidate k): the crops
    the prefix already attends to are the regions an entity is grounded in, so one input serves both, and their number
    is the crop slots' (16 for Twitter-GMNER, as the published systems ground in up to 16-18 detections; a few on a
    CPU).

    The scorer compares an entity with each candidate's own features. An entity is the mean of the last layer's
    states at the first sub-words of its words (the states the CRF reads), projected; a candidate is the backbone's
    pooled features of its crop slot (`HVPNetModel.slot_features`, which the prefix is built from, so the backbone
    runs once), averaged over the grid and projected to the text width with a LayerNorm. Its score is their scaled
    dot product: each candidate is judged on its own pixels, whatever its slot or the number of candidates, while the
    entity's states, which attended to every crop through the prefix, bring the text and the image context. "None" is
    a learned linear score of the entity representation, since whether an entity is pictured depends on the entity
    (a person is more often pictured than a city). Training uses gold spans (`entity_spans`) with soft targets over
    the candidates matching the gold boxes (`region_targets`); `decode_entities` grounds the CRF's own entities.
    """

    def __init__(self, config: HVPNetConfig):
        super().__init__(config)
        encoder = self.hvpnet.visual_encoder
        if not isinstance(encoder, HVPNetVisualPrefixEncoder) or config.num_object_images < 1:
            raise ValueError(
                "HVPNetForGroundedTokenClassification scores the object crops' own backbone features: it needs "
                "use_visual_prefix=True, a paper prefix_mode ('pyramid', 'flat' or 'one_to_three') and "
                f"num_object_images >= 1, got use_visual_prefix={config.use_visual_prefix}, "
                f"prefix_mode={config.prefix_mode!r}, num_object_images={config.num_object_images}"
            )
        hidden_size = config.text_config.hidden_size
        self.candidate_projection = nn.Linear(sum(encoder.stage_channels), hidden_size)
        self.candidate_norm = nn.LayerNorm(hidden_size, eps=config.text_config.layer_norm_eps)
        self.entity_projection = nn.Linear(hidden_size, hidden_size)
        self.none_scorer = nn.Linear(hidden_size, 1)
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
        image_features: torch.Tensor | None = None,
        image_features_mask: torch.Tensor | None = None,
        word_start_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        entity_spans: torch.Tensor | None = None,
        region_labels: torch.Tensor | None = None,
        output_gate_weights: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> HVPNetGroundedTokenClassifierOutput:
        """
        pixel_values, image_mask, image_features, image_features_mask: as for `HVPNetModel`; slot k + 1 is candidate k.
        word_start_mask, labels: as for `HVPNetForTokenClassification`; `word_start_mask` (or `labels`) is needed
            with `entity_spans`.
        entity_spans: (B, E, 2) word spans [start, end) of the entities to ground, counted in the words that
            `word_start_mask` marks in each row; padding entities are (-100, -100).
        region_labels: (B, E, K + 1) target distribution of every entity over the candidates and "none" (last),
            e.g. `region_targets` of the candidates matching its gold boxes; rows of padding entities are not read.
        """
        text_shape = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        if labels is not None:
            word_start_mask = self._labeled_word_starts(labels, word_start_mask, attention_mask, text_shape)
        if region_labels is not None and entity_spans is None:
            raise ValueError("region_labels were given without entity_spans, the entities they ground")
        if entity_spans is not None and word_start_mask is None:
            raise ValueError("entity_spans are counted in words: pass word_start_mask (or labels)")
        if pixel_values is not None and image_features is None:
            image_features, image_features_mask = self.hvpnet.slot_features(pixel_values, image_mask, text_shape[0])
            pixel_values = image_mask = None
        outputs = self.hvpnet(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            pixel_values=pixel_values,
            image_mask=image_mask,
            inputs_embeds=inputs_embeds,
            image_features=image_features,
            image_features_mask=image_features_mask,
            output_gate_weights=output_gate_weights,
            return_dict=True,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        emissions = self.classifier(self.dropout(hidden))
        candidate_embeddings, candidate_mask = self._candidates(image_features, image_features_mask, text_shape[0])
        region_logits = loss = None
        if entity_spans is not None:
            region_logits = self.score_regions(
                hidden, word_start_mask, entity_spans, candidate_embeddings, candidate_mask
            )
        losses = []
        if labels is not None:
            losses.append(self._crf_loss(emissions, labels, word_start_mask))
        if region_labels is not None:
            losses.append(self._region_loss(region_logits, region_labels, entity_spans, candidate_mask))
        if losses:
            loss = sum(losses)
        return HVPNetGroundedTokenClassifierOutput(
            loss=loss,
            logits=emissions,
            region_logits=region_logits,
            last_hidden_state=hidden,
            candidate_embeddings=candidate_embeddings,
            candidate_mask=candidate_mask,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            gate_weights=outputs.gate_weights,
        )

    def _candidates(
        self, image_features: torch.Tensor | None, image_features_mask: torch.Tensor | None, batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, K, d) candidate embeddings and (B, K) presence from the slot features (B, 1 + K, g*g, C), or none
        present without images."""
        num_candidates = self.config.num_object_images
        weight = self.candidate_projection.weight
        if image_features is None:
            embeddings = weight.new_zeros(batch_size, num_candidates, weight.shape[0])
            return embeddings, torch.zeros(batch_size, num_candidates, dtype=torch.bool, device=weight.device)
        present = _presence("image_features_mask", image_features_mask, image_features, batch_size)[:, 1:]
        pooled = image_features[:, 1:].mean(dim=2).to(weight.dtype)  # (B, K, C): the crops' grid averaged
        embeddings = self.candidate_norm(self.candidate_projection(pooled))
        return embeddings.masked_fill(~present[..., None], 0.0), present

    def score_regions(
        self,
        last_hidden_state: torch.Tensor,
        word_start_mask: torch.Tensor,
        entity_spans: torch.Tensor,
        candidate_embeddings: torch.Tensor,
        candidate_mask: torch.Tensor,
    ) -> torch.Tensor:
        """(B, E, K + 1) region logits (candidates, then "none") of the word spans `entity_spans` (B, E, 2), from the
        text states (B, T, d) and the candidates (B, K, d) of a forward; see `forward` for the layout."""
        word_index, word_mask = _word_positions(word_start_mask.bool())
        is_entity = _check_entity_spans(entity_spans, word_mask.sum(dim=1), word_start_mask.shape[0])
        words = torch.arange(word_index.shape[1], device=entity_spans.device)
        starts, ends = entity_spans[..., :1], entity_spans[..., 1:]
        membership = ((words >= starts) & (words < ends) & is_entity[..., None]).to(last_hidden_state.dtype)
        word_states = last_hidden_state.gather(1, word_index[..., None].expand(-1, -1, last_hidden_state.shape[-1]))
        # (B, E, d): the mean state of each entity's words; padding entities get the zero vector.
        entities = membership @ word_states / membership.sum(dim=-1, keepdim=True).clamp(min=1)
        entities = self.dropout(entities)
        scale = candidate_embeddings.shape[-1] ** -0.5
        candidate_scores = self.entity_projection(entities) @ candidate_embeddings.transpose(1, 2) * scale
        candidate_scores = candidate_scores.masked_fill(~candidate_mask[:, None, :], torch.finfo(entities.dtype).min)
        logits = torch.cat([candidate_scores, self.none_scorer(entities)], dim=-1)
        return logits.masked_fill(~is_entity[..., None], torch.finfo(logits.dtype).min)

    def _region_loss(
        self,
        region_logits: torch.Tensor,
        region_labels: torch.Tensor,
        entity_spans: torch.Tensor,
        candidate_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Cross-entropy of the region logits against the target distributions, averaged over the real entities,
        in float32."""
        if region_labels.shape != region_logits.shape:
            raise ValueError(
                f"region_labels must have shape {tuple(region_logits.shape)} (batch, entities, num_object_images + 1 "
                f"for 'none'), got {tuple(region_labels.shape)}"
            )
        is_entity = entity_spans[..., 0] != -100
        targets = region_labels.float()
        if not (torch.compiler.is_compiling() or torch.compiler.is_exporting()):
            real = targets[is_entity]
            on_absent = (targets[..., :-1] > 0) & ~candidate_mask[:, None, :] & is_entity[..., None]
            if (real < 0).any() or not torch.allclose(real.sum(dim=-1), torch.ones_like(real[..., 0]), atol=1e-4):
                raise ValueError("region_labels of every entity must be a distribution: >= 0, summing to 1")
            if on_absent.any():
                raise ValueError("region_labels put weight on a candidate whose crop is absent (image_mask False)")
        log_probabilities = region_logits.float().log_softmax(dim=-1)
        # Absent candidates have no weight: 0 * their very negative log-probability stays 0.
        losses = -(targets * log_probabilities).sum(dim=-1)
        return losses[is_entity].sum() / is_entity.sum().clamp(min=1)

    @torch.no_grad()
    def decode_entities(
        self, outputs: HVPNetGroundedTokenClassifierOutput, word_start_mask: torch.Tensor
    ) -> list[list[dict[str, Any]]]:
        """Per row, the CRF's entities of a forward's `outputs`, each grounded: `start`, `end` (its word span, as in
        `entity_spans`), `type`, `candidate` (the index of its region among the candidates, or None for "none") and
        `score` (the region's probability)."""
        tags = self.decode(outputs.logits, word_start_mask).tolist()
        starts = word_start_mask.bool().tolist()
        rows = []
        for row_tags, row_starts in zip(tags, starts, strict=True):
            names = [self.config.id2label[tag] for tag, start in zip(row_tags, row_starts, strict=True) if start]
            rows.append([(entity_type, first, last + 1) for entity_type, first, last in bio_entities(names)])
        num_entities = max(map(len, rows), default=0)
        spans = torch.full((len(rows), num_entities, 2), -100, dtype=torch.long, device=outputs.logits.device)
        for row, entities in enumerate(rows):
            for index, (_, start, end) in enumerate(entities):
                spans[row, index] = torch.tensor([start, end])
        logits = self.score_regions(
            outputs.last_hidden_state, word_start_mask, spans, outputs.candidate_embeddings, outputs.candidate_mask
        )
        probabilities = logits.float().softmax(dim=-1)
        scores, regions = probabilities.max(dim=-1)
        num_candidates = probabilities.shape[-1] - 1
        return [
            [
                {
                    "start": start,
                    "end": end,
                    "type": entity_type,
                    "candidate": None if int(regions[row, index]) == num_candidates else int(regions[row, index]),
                    "score": float(scores[row, index]),
                }
                for index, (entity_type, start, end) in enumerate(entities)
            ]
            for row, entities in enumerate(rows)
        ]


def region_targets(matches: torch.Tensor) -> torch.Tensor:
    """The target of one entity over its K candidates and "none" (K + 1,), from `matches` (K,) bool, which candidates
    are its region (`grounding_data.candidate_matches`): the weight spread evenly over them, or all on "none" when
    none matches (an ungroundable entity, or one that no candidate covers)."""
    matches = matches.float()
    none = (matches.sum() == 0).float()[None]
    return torch.cat([matches, none]) / (matches.sum() + none)


def _check_entity_spans(entity_spans: torch.Tensor, num_words: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(B, E) bool, True for real entities (not (-100, -100) padding); spans that are not word spans of their row
    are an error (when the forward runs eagerly)."""
    if entity_spans.dim() != 3 or entity_spans.shape[0] != batch_size or entity_spans.shape[2] != 2:
        raise ValueError(
            f"entity_spans must have shape (batch={batch_size}, entities, 2) word spans [start, end), got "
            f"{tuple(entity_spans.shape)}"
        )
    if entity_spans.is_floating_point():
        raise ValueError("entity_spans must hold integer word offsets")
    is_entity = entity_spans[..., 0] != -100
    if not (torch.compiler.is_compiling() or torch.compiler.is_exporting()):
        starts, ends = entity_spans[..., 0], entity_spans[..., 1]
        bad = is_entity & ~((starts >= 0) & (starts < ends) & (ends <= num_words[:, None]))
        bad |= ~is_entity & (ends != -100)
        if bad.any():
            row, entity = bad.nonzero()[0].tolist()
            raise ValueError(
                f"entity_spans[{row}, {entity}] = {entity_spans[row, entity].tolist()} is not a word span [start, end) "
                f"of row {row}'s {int(num_words[row])} words (word_start_mask), nor padding (-100, -100)"
            )
    return is_entity


def rank_relations(
    logits: torch.Tensor, id2label: Mapping[int, str], top_k: int | None = None
) -> list[list[dict[str, Any]]]:
    """Per row of relation logits (B, num_labels), the `top_k` most probable relations (all without it), best first,
    as `{"relation": name, "score": probability}`; probabilities are computed in float32."""
    probabilities = logits.float().softmax(dim=-1)
    scores, labels = probabilities.topk(min(top_k or probabilities.shape[-1], probabilities.shape[-1]), dim=-1)
    return [
        [{"relation": id2label[int(label)], "score": float(score)} for score, label in zip(*row, strict=True)]
        for row in zip(scores, labels, strict=True)
    ]


class HVPNetForSequenceClassification(HVPNetPreTrainedModel):
    """HVPNeT with a relation classifier (paper §3.4), for multimodal relation extraction.

    With `relation_pooling="entity_markers"` (default) the classifier reads the last hidden states at the head and
    tail start markers (`<s>`, `<o>`), concatenated; with `"cls"` it reads the `[CLS]` state. `decode` ranks the
    relations of the logits.
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
    ) -> HVPNetSequenceClassifierOutput:
        """
        inputs_embeds: (B, T, d) instead of input_ids; with `relation_pooling="entity_markers"` the markers are the
            positions whose embedding is exactly the marker token's row of the input embeddings.
        labels: by `config.problem_type`, as for `BertForSequenceClassification`: (B,) relation ids
            ("single_label_classification", the default for integer labels), (B, num_labels) 0/1 floats
            ("multi_label_classification": several relations per entity pair, the default for float labels), or
            (B,) / (B, num_labels) targets ("regression", the default with num_labels=1).
        """
        batch_size = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        problem_type = None if labels is None else self._problem_type(labels, batch_size)
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
            rows = torch.arange(hidden.shape[0], device=hidden.device)  # `len` would fix the batch size in a graph
            head = self._marker_positions(input_ids, inputs_embeds, "head_start_token_id", "<s>")
            tail = self._marker_positions(input_ids, inputs_embeds, "tail_start_token_id", "<o>")
            features = torch.cat([hidden[rows, head], hidden[rows, tail]], dim=-1)
        logits = self.classifier(self.dropout(features))
        loss = None
        if labels is not None:
            # transformers' helper sets an unset `problem_type` on the config it is given: it gets the type found
            # here, so the model's config stays as it was built.
            loss_config = SimpleNamespace(num_labels=self.num_labels, problem_type=problem_type)
            targets = labels if problem_type == "single_label_classification" else labels.float()
            loss = self.loss_function(targets, logits.float(), loss_config)  # float32 also under autocast
        return HVPNetSequenceClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            gate_weights=outputs.gate_weights,
        )

    def _problem_type(self, labels: torch.Tensor, batch_size: int) -> str:
        """`config.problem_type`, or when unset the one `BertForSequenceClassification` chooses from the labels;
        labels of the wrong shape for it are an error."""
        problem_type = self.config.problem_type
        if problem_type is None:
            if self.num_labels == 1:
                problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem_type = "single_label_classification"
            else:
                problem_type = "multi_label_classification"
        logits_shape = (batch_size, self.num_labels)
        if problem_type == "single_label_classification" and labels.shape != (batch_size,):
            raise ValueError(
                f"labels must have shape ({batch_size},) (one relation id each), got {tuple(labels.shape)}"
            )
        if problem_type == "multi_label_classification" and labels.shape != logits_shape:
            raise ValueError(
                f"multi-label labels must have shape {logits_shape} (0/1 per relation), got {tuple(labels.shape)}"
            )
        if problem_type == "regression" and (
            labels.shape not in ((batch_size,), logits_shape) or (labels.dim() == 1 and self.num_labels != 1)
        ):
            raise ValueError(f"regression labels must have shape {logits_shape}, got {tuple(labels.shape)}")
        return problem_type

    def _marker_positions(
        self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None, setting: str, token: str
    ) -> torch.Tensor:
        """(B,) position of the first marker `config.<setting>` in every row; a row without it is an error (when
        the forward runs eagerly: a traced graph cannot raise on its inputs' values)."""
        marker_id = getattr(self.config, setting)
        if marker_id is None:
            raise ValueError(f"config.{setting} is not set; take it from the processor's tokenizer ({token})")
        if input_ids is not None:
            is_marker = input_ids == marker_id
        else:
            marker_embedding = self.get_input_embeddings().weight[marker_id].to(inputs_embeds.dtype)
            is_marker = (inputs_embeds == marker_embedding).all(dim=-1)
        if not (torch.compiler.is_compiling() or torch.compiler.is_exporting()):
            missing = (~is_marker.any(dim=1)).nonzero().flatten().tolist()
            if missing:
                found_by = "in input_ids" if input_ids is not None else "(by its embedding row) in inputs_embeds"
                raise ValueError(
                    f"RE input rows {missing} lack the entity marker {setting} {token} = {marker_id} {found_by}"
                )
        return is_marker.int().argmax(dim=1)

    @torch.no_grad()
    def decode(self, logits: torch.Tensor, top_k: int | None = None) -> list[list[dict[str, Any]]]:
        """The relations of the logits (B, num_labels), ranked by `rank_relations` under `config.id2label`."""
        return rank_relations(logits, self.config.id2label, top_k)


def checkpoint_with_visual_prefix(
    checkpoint_function: Callable, layer_forward: Callable, *args: torch.Tensor
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Run `checkpoint_function`, the layers' activation checkpointing function, on a text layer with the visual
    prefix's keys and values among its positional inputs.

    A layer hands its checkpointing function its forward with the keyword arguments bound (`layer_forward`, a
    `partial` holding `visual_prefix`) and its positional inputs (`args`). Reentrant checkpointing
    (`use_reentrant=True`) only tracks positional tensors: with the prefix bound as a keyword, each layer's
    recomputation in backward would backpropagate through the prefix encoder's graph on its own, and the next layer
    would find that graph freed. A wrapper around the installed function (transformers' own tests install one that
    counts the calls) hides the keywords; such a call is checkpointed without reentrance, which tracks every tensor.
    """
    if not isinstance(layer_forward, partial):
        return checkpoint_function(layer_forward, *args, use_reentrant=False)
    visual_prefix = layer_forward.keywords.get("visual_prefix")
    if visual_prefix is None:
        return checkpoint_function(layer_forward, *args)
    num_inputs, num_layers = len(args), len(visual_prefix.keys)

    def forward_with_prefix(*inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        keys_and_values = inputs[num_inputs:]
        prefix = replace(visual_prefix, keys=keys_and_values[:num_layers], values=keys_and_values[num_layers:])
        return layer_forward(*inputs[:num_inputs], visual_prefix=prefix)

    return checkpoint_function(forward_with_prefix, *args, *visual_prefix.keys, *visual_prefix.values)


def _check_config_kwargs(config_kwargs: dict) -> None:
    """Refuse keywords of `from_text_vision_pretrained` that no configuration reads. `PreTrainedConfig` keeps unknown
    keys as attributes (for configs written by other versions), so a misspelled setting would otherwise build the
    model with the default in its place."""
    builder_arguments = {"text_model_name_or_path", "vision_backbone", "vision_pretrained", "processor"}
    known = ({item.name for item in fields(HVPNetConfig)} - builder_arguments - {"text_config"}) | {"num_labels"}
    unknown = sorted(set(config_kwargs) - known)
    if unknown:
        hints = [
            f"{name!r} (did you mean {close[0]!r}?)" if (close := get_close_matches(name, known, n=1)) else repr(name)
            for name in unknown
        ]
        raise TypeError(
            f"from_text_vision_pretrained got unknown settings {', '.join(hints)}; it takes the arguments "
            f"{sorted(builder_arguments)} and the settings of HVPNetConfig"
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


def _pad_slots(images: torch.Tensor, present: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """images (B, n, 3, H, W) and present (B, n) padded with absent images to `num_slots` slots."""
    missing = num_slots - images.shape[1]
    if missing <= 0:
        return images, present
    images = torch.cat([images, images.new_zeros(images.shape[0], missing, *images.shape[2:])], dim=1)
    return images, torch.cat([present, present.new_zeros(present.shape[0], missing)], dim=1)


def _presence(name: str, mask: torch.Tensor | None, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(B, n) bool: which of the given image slots hold a real image (all of them without a mask)."""
    slots = (batch_size, images.shape[1])
    if mask is None:
        return torch.ones(slots, dtype=torch.bool, device=images.device)
    if tuple(mask.shape) != slots:
        raise ValueError(f"{name} must have shape {slots}, got {tuple(mask.shape)}")
    return mask.to(device=images.device, dtype=torch.bool)


__all__ = [
    "HVPNetForGroundedTokenClassification",
    "HVPNetForSequenceClassification",
    "HVPNetForTokenClassification",
    "HVPNetModel",
    "HVPNetPreTrainedModel",
    "HVPNetSelfAttention",
    "HVPNetVisualPrefixEncoder",
    "rank_relations",
    "region_targets",
    "viterbi_decode",
]
