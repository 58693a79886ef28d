"""PyTorch HVPNeT: a BERT encoder whose self-attention layers also attend to a hierarchical visual prefix.

Chen et al., "Good Visual Guidance Makes A Better Extractor: Hierarchical Visual Prefix for Multimodal Entity and
Relation Extraction", NAACL 2022 Findings. Section numbers in comments refer to that paper.

Shapes: B = batch, T = text length, n = images per example (global image + object crops), L = text layers,
c = backbone stages, g = prefix grid side, P = n * g * g prefix tokens, d = hidden size, H = heads, h = head size.
"""

from collections.abc import Callable
from dataclasses import dataclass

import timm
import torch
from torch import nn
from torchcrf import CRF
from transformers import BertConfig, BertModel, PreTrainedModel
from transformers.modeling_outputs import ModelOutput, SequenceClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.bert.modeling_bert import BertSelfAttention, eager_attention_forward

from .configuration_hvpnet import HVPNetConfig


@dataclass
class HVPNetModelOutput(ModelOutput):
    """
    last_hidden_state: (B, T, d) text states of the last layer.
    pooler_output: (B, d) BERT pooler over `[CLS]`, when the model has a pooler.
    hidden_states: tuple of L + 1 tensors (B, T, d), embeddings first, when `output_hidden_states=True`.
    attentions: tuple of L tensors (B, H, T, P + T), prefix keys first, when `output_attentions=True` (eager
        attention only).
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
    """Per-layer visual prefix: keys and values (L, B, H, P, h), mask (B, P) True where an image is present,
    gate weights (B, n, L, c)."""

    keys: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor
    gate_weights: torch.Tensor


class HVPNetSelfAttention(BertSelfAttention):
    """BERT self-attention whose keys and values are prefixed by this layer's visual prefix (paper eq. 9).

    Queries stay text-only, so the output keeps the text length. `attention_mask` must cover the prefix and the
    text, (B, 1, 1 or T, P + T) additive; the model builds it once for all layers.
    """

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        visual_prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.attention_head_size)
        query = self.query(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.key(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.value(hidden_states).view(hidden_shape).transpose(1, 2)
        if visual_prefix is not None:
            prefix_key, prefix_value = visual_prefix
            key = torch.cat([prefix_key.to(key.dtype), key], dim=2)
            value = torch.cat([prefix_value.to(value.dtype), value], dim=2)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        kwargs.pop("encoder_hidden_states", None)
        kwargs.pop("past_key_values", None)
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
        self.backbone = timm.create_model(
            config.vision_backbone,
            pretrained=False,
            features_only=True,
            out_indices=tuple(config.vision_out_indices),
        )
        # Keep timm's own initialisation: transformers' N(0, 0.02) re-init would leave a random CNN with vanishing
        # activations, and pretrained weights are loaded over it anyway.
        for module in self.backbone.modules():
            module._is_hf_initialized = True
        if self.freeze_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

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
        chunks = images.split(self.chunk_size) if self.chunk_size else (images,)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            return torch.cat(
                [
                    self.pool_feature_maps(self.backbone(chunk.contiguous(memory_format=torch.channels_last)))
                    for chunk in chunks
                ]
            )

    def pool_feature_maps(self, feature_maps: list[torch.Tensor]) -> torch.Tensor:
        """One map (N, C_i, H_i, W_i) per pyramid level → (N, g*g, C) the features the trainable part reads."""
        raise NotImplementedError

    def prefix_from_features(self, features: torch.Tensor, present: torch.Tensor) -> VisualPrefix:
        """features (B, n, g*g, C) from `visual_features`, present (B, n) bool → the per-layer visual prefix."""
        raise NotImplementedError

    def load_pretrained_backbone(self, pretrained: bool | str, backbone_name: str, out_indices: list[int]) -> None:
        """Load timm's pretrained weights (`True`) or a local checkpoint file (a path) into the backbone."""
        overlay = {"file": pretrained} if isinstance(pretrained, str) else None
        source = timm.create_model(
            backbone_name,
            pretrained=True,
            features_only=True,
            out_indices=tuple(out_indices),
            pretrained_cfg_overlay=overlay,
        )
        self.backbone.load_state_dict(source.state_dict())


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
        # Eq. 8: the L key/value projections W_l^phi (d -> 2d), applied to all layers in one einsum.
        self.key_value_weight = nn.Parameter(torch.empty(self.num_layers, 2 * self.hidden_size, self.hidden_size))
        self.key_value_bias = nn.Parameter(torch.empty(self.num_layers, 2 * self.hidden_size))

    def _fixed_gate(self, num_stages: int) -> torch.Tensor:
        """(L, c) one-hot routing of the ablations: "flat" (one stage) or "one_to_three" (stage i feeds a contiguous
        block of layers: with 12 layers and 4 stages, layers 3i..3i+2)."""
        stage_of_layer = torch.arange(self.num_layers) * num_stages // self.num_layers
        return nn.functional.one_hot(stage_of_layer, num_stages).float()

    def pool_feature_maps(self, feature_maps: list[torch.Tensor]) -> torch.Tensor:
        """Every used stage average-pooled to g x g, as g*g tokens, concatenated on channels: (N, g*g, C)."""
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
            logits = nn.functional.leaky_relu(self.gate(summary)).view(len(features), self.num_layers, -1)
            gate_weights = logits.softmax(dim=-1)
        else:
            gate_weights = self.fixed_gate.to(stage_tokens.dtype).expand(len(features), -1, -1)
        # Eq. 5: gated sum over stages, for every layer at once.
        return torch.einsum("nlc,nctd->nltd", gate_weights, stage_tokens), gate_weights

    def forward(self, images: torch.Tensor, present: torch.Tensor) -> VisualPrefix:
        """images (B, n, 3, H, W) global image first, then object crops; present (B, n) bool."""
        flat_present = present.flatten()
        features = images.new_zeros(flat_present.numel(), self.grid**2, sum(self.stage_channels))
        if flat_present.any():  # absent images never reach the backbone; autocast may give lower-precision features
            features[flat_present] = self.visual_features(images.flatten(0, 1)[flat_present]).to(features.dtype)
        return self.prefix_from_features(features.view(*present.shape, *features.shape[1:]), present)

    def prefix_from_features(self, features: torch.Tensor, present: torch.Tensor) -> VisualPrefix:
        """features (B, n, g*g, C) from `visual_features` (rows of absent images are not read); present (B, n)."""
        batch_size, num_images = present.shape
        flat_present = present.flatten()
        gated = features.new_zeros(batch_size * num_images, self.num_layers, self.grid**2, self.hidden_size)
        gate_weights = features.new_zeros(batch_size * num_images, self.num_layers, self.num_stages)
        if flat_present.any():
            present_gated, present_gate_weights = self.gated_features(features.flatten(0, 1)[flat_present])
            gated[flat_present] = present_gated.to(gated.dtype)
            gate_weights[flat_present] = present_gate_weights.to(gate_weights.dtype)

        # Eq. 6: concatenate the images of one example on the token axis: (B, L, P, d).
        prefix = gated.view(batch_size, num_images, self.num_layers, -1, self.hidden_size).transpose(1, 2)
        prefix = prefix.flatten(2, 3)
        # Eq. 8: per-layer projection to keys and values, split into heads: (2, L, B, H, P, h).
        key_value = torch.einsum("blpd,led->blpe", prefix, self.key_value_weight) + self.key_value_bias[:, None]
        key_value = key_value.view(batch_size, self.num_layers, prefix.shape[2], 2, self.num_heads, -1)
        key_value = key_value.permute(3, 1, 0, 4, 2, 5)
        return VisualPrefix(
            keys=key_value[0],
            values=key_value[1],
            mask=present.repeat_interleave(self.grid**2, dim=1),
            gate_weights=gate_weights.view(batch_size, num_images, self.num_layers, -1),
        )

    @property
    def num_stages(self) -> int:
        return len(self.stage_indices)


class HVPNetPreTrainedModel(PreTrainedModel):
    config_class = HVPNetConfig
    config: HVPNetConfig
    base_model_prefix = "hvpnet"
    main_input_name = "input_ids"
    input_modalities = ("text", "image")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_attention_backend = True
    _no_split_modules = ["BertEmbeddings", "BertLayer"]
    # The heads average their losses over the batch themselves; Trainer must not expect `num_items_in_batch` use.
    accepts_loss_kwargs = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, HVPNetVisualPrefixEncoder):
            std = self.config.text_config.initializer_range
            nn.init.normal_(module.key_value_weight, mean=0.0, std=std)
            nn.init.zeros_(module.key_value_bias)

    @classmethod
    def from_text_vision_pretrained(
        cls,
        text_model_name_or_path: str,
        vision_backbone: str = "resnet50",
        vision_pretrained: bool | str = False,
        tokenizer=None,
        **config_kwargs,
    ) -> "HVPNetPreTrainedModel":
        """Build an HVPNeT model around a pretrained BERT (and optionally pretrained backbone weights).

        `vision_pretrained`: False (random backbone), True (timm's pretrained weights) or a local checkpoint path.
        `tokenizer`: when given, the embeddings are resized to `len(tokenizer)` and the relation marker ids are read
        from its `<s>` and `<o>` tokens if present.
        """
        text_config = BertConfig.from_pretrained(text_model_name_or_path)
        if tokenizer is not None:
            vocabulary = tokenizer.get_vocab()
            config_kwargs.setdefault("head_start_token_id", vocabulary.get("<s>"))
            config_kwargs.setdefault("tail_start_token_id", vocabulary.get("<o>"))
        config = HVPNetConfig(
            text_config=text_config,
            vision_backbone=vision_backbone,
            vision_pretrained=bool(vision_pretrained),
            **config_kwargs,
        )
        model = cls(config)
        base = model if isinstance(model, HVPNetModel) else model.hvpnet
        pretrained_text = BertModel.from_pretrained(text_model_name_or_path).state_dict()
        if base.text_model.pooler is None:  # the task heads read token states, not the pooler
            pretrained_text = {
                name: weight for name, weight in pretrained_text.items() if not name.startswith("pooler.")
            }
        base.text_model.load_state_dict(pretrained_text)
        if vision_pretrained and base.visual_encoder is not None:
            base.visual_encoder.load_pretrained_backbone(vision_pretrained, vision_backbone, config.vision_out_indices)
        if tokenizer is not None and len(tokenizer) != text_config.vocab_size:
            model.resize_token_embeddings(len(tokenizer))
        return model


class HVPNetModel(HVPNetPreTrainedModel):
    """The HVPNeT encoder: BERT with a visual prefix in every self-attention layer.

    Its text encoder is a `BertModel` whose self-attention modules are `HVPNetSelfAttention`, so pretrained BERT
    weights load into it unchanged. With `use_visual_prefix=False`, or when every image is masked (paper modes), it
    computes exactly what `BertModel` computes.
    """

    def __init__(self, config: HVPNetConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.text_model = BertModel(config.text_config, add_pooling_layer=add_pooling_layer)
        for index, layer in enumerate(self.text_model.encoder.layer):
            layer.attention.self = HVPNetSelfAttention(config.text_config, layer_idx=index)
        if not config.use_visual_prefix:
            self.visual_encoder = None
        elif config.prefix_mode == "original":
            # The authors' code layout lives in its own module; imported here because that module builds on this one.
            from .modeling_hvpnet_original import HVPNetOriginalVisualPrefixEncoder

            self.visual_encoder = HVPNetOriginalVisualPrefixEncoder(config)
        else:
            self.visual_encoder = HVPNetVisualPrefixEncoder(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.text_model.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.text_model.embeddings.word_embeddings = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        object_pixel_values: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        object_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        output_gate_weights: bool = False,
        return_dict: bool | None = None,
        image_features: torch.Tensor | None = None,
        image_features_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> HVPNetModelOutput | tuple:
        """
        input_ids, attention_mask, token_type_ids, position_ids: (B, T) as for BERT; text positions start at 0.
        pixel_values: (B, 3, H, W) the global image. object_pixel_values: (B, k, 3, H, W), k <= num_object_images.
        image_mask: (B,) and object_mask: (B, k), False where an image is absent (its prefix is masked out).
        image_features: instead of pixels, (B, 1 + num_object_images, g*g, C) the frozen backbone's pooled
            features of the global image and the crops, as `VisualFeatureCache` serves them;
            image_features_mask: (B, 1 + num_object_images) bool, False where an image is absent.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds")
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        if output_attentions and self.text_model.config._attn_implementation != "eager":
            raise ValueError("output_attentions=True needs attn_implementation='eager' (sdpa returns no weights)")
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        text = input_ids if input_ids is not None else inputs_embeds[..., 0]
        batch_size, text_length = text.shape
        if attention_mask is None:
            attention_mask = torch.ones(batch_size, text_length, dtype=torch.bool, device=text.device)

        hidden = self.text_model.embeddings(
            input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids, inputs_embeds=inputs_embeds
        )
        if image_features is not None:
            if pixel_values is not None or object_pixel_values is not None:
                raise ValueError("Pass either pixel values or image_features, not both")
            prefix = self.visual_prefix_from_features(image_features, image_features_mask, batch_size)
        else:
            prefix = self.visual_prefix(pixel_values, object_pixel_values, image_mask, object_mask, batch_size)
        key_mask = attention_mask.bool() if prefix is None else torch.cat([prefix.mask, attention_mask.bool()], dim=1)
        # One additive mask (B, 1, 1, P + T) for every layer; it works for eager and sdpa attention alike.
        additive_mask = torch.zeros(key_mask.shape, dtype=hidden.dtype, device=hidden.device)
        additive_mask = additive_mask.masked_fill(~key_mask, torch.finfo(hidden.dtype).min)[:, None, None, :]

        layers = self.text_model.encoder.layer
        all_hidden_states = (hidden,) if output_hidden_states else None
        attentions = []
        # BertLayer returns only its states: attention weights are read off the self-attention outputs on request.
        hooks = [
            layer.attention.self.register_forward_hook(lambda module, args, output: attentions.append(output[1]))
            for layer in (layers if output_attentions else [])
        ]
        try:
            for index, layer in enumerate(layers):
                layer_prefix = None if prefix is None else (prefix.keys[index], prefix.values[index])
                hidden = layer(hidden, additive_mask, visual_prefix=layer_prefix, **kwargs)
                if output_hidden_states:
                    all_hidden_states += (hidden,)
        finally:
            for hook in hooks:
                hook.remove()

        pooled = self.text_model.pooler(hidden) if self.text_model.pooler is not None else None
        gate_weights = prefix.gate_weights if output_gate_weights and prefix is not None else None
        output = HVPNetModelOutput(
            last_hidden_state=hidden,
            pooler_output=pooled,
            hidden_states=all_hidden_states,
            attentions=tuple(attentions) if output_attentions else None,
            gate_weights=gate_weights,
        )
        return output if return_dict else output.to_tuple()

    def visual_prefix(
        self,
        pixel_values: torch.Tensor | None,
        object_pixel_values: torch.Tensor | None,
        image_mask: torch.Tensor | None,
        object_mask: torch.Tensor | None,
        batch_size: int,
    ) -> VisualPrefix | None:
        """Validate the image inputs, stack them as (B, n, 3, H, W) with a presence mask (B, n), build the prefix."""
        if self.visual_encoder is None or (pixel_values is None and object_pixel_values is None):
            return None
        images, present = [], []
        if pixel_values is not None:
            _check_images("pixel_values", pixel_values, 4, batch_size)
            _check_mask("image_mask", image_mask, (batch_size,))
        if self.config.use_global_image:
            images.append(None if pixel_values is None else pixel_values[:, None])
            present.append(_presence(image_mask, pixel_values, (batch_size, 1)))
        num_objects = self.config.num_object_images
        if num_objects > 0:
            if object_pixel_values is not None:
                _check_images("object_pixel_values", object_pixel_values, 5, batch_size)
                given = object_pixel_values.shape[1]
                if given > num_objects:
                    raise ValueError(
                        f"object_pixel_values has {given} object images per example but the model is configured "
                        f"for at most num_object_images={num_objects}"
                    )
                _check_mask("object_mask", object_mask, (batch_size, given))
            images.append(object_pixel_values)
            present.append(_presence(object_mask, object_pixel_values, (batch_size, num_objects)))

        reference = next((image for image in images if image is not None), None)
        if reference is None:
            return None
        image_shape = reference.shape[2:]
        stacked = []
        for image, mask in zip(images, present, strict=True):
            if image is None:
                image = reference.new_zeros(batch_size, mask.shape[1], *image_shape)
            elif image.shape[2:] != image_shape:
                raise ValueError(
                    f"pixel_values and object_pixel_values must share one image shape, got {tuple(image_shape)} "
                    f"and {tuple(image.shape[2:])}"
                )
            elif image.shape[1] < mask.shape[1]:  # fewer crops than slots: pad with absent images
                padding = image.new_zeros(batch_size, mask.shape[1] - image.shape[1], *image_shape)
                image = torch.cat([image, padding], dim=1)
            stacked.append(image)
        return self.visual_encoder(torch.cat(stacked, dim=1), torch.cat(present, dim=1).to(reference.device))

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
        _check_mask("image_features_mask", image_features_mask, (batch_size, num_slots))
        present = (
            torch.ones(batch_size, num_slots, dtype=torch.bool, device=image_features.device)
            if image_features_mask is None
            else image_features_mask.bool()
        )
        if not self.config.use_global_image:
            image_features, present = image_features[:, 1:], present[:, 1:]
        return self.visual_encoder.prefix_from_features(image_features, present)


def _check_images(name: str, images: torch.Tensor, rank: int, batch_size: int) -> None:
    expected = "(batch, 3, height, width)" if rank == 4 else "(batch, num_objects, 3, height, width)"
    if images.dim() != rank or images.shape[0] != batch_size or images.shape[-3] != 3:
        raise ValueError(f"{name} must have shape {expected} with batch={batch_size}, got {tuple(images.shape)}")


def _check_mask(name: str, mask: torch.Tensor | None, shape: tuple[int, ...]) -> None:
    if mask is not None and tuple(mask.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(mask.shape)}")


def _presence(mask: torch.Tensor | None, images: torch.Tensor | None, slots: tuple[int, int]) -> torch.Tensor:
    """(B, slots) bool: which image slots hold a real image. Slots past the given images are absent."""
    batch_size, num_slots = slots
    present = torch.zeros(slots, dtype=torch.bool, device=None if images is None else images.device)
    if images is not None:
        given = images.shape[1] if images.dim() == 5 else 1
        present[:, :given] = True if mask is None else mask.bool().view(batch_size, given)
    return present


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
                nn.init.uniform_(transitions, -0.1, 0.1)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        object_pixel_values: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        object_mask: torch.Tensor | None = None,
        word_start_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_gate_weights: bool = False,
        return_dict: bool | None = None,
        **kwargs,
    ) -> HVPNetTokenClassifierOutput | tuple:
        """
        word_start_mask: (B, T) bool, True at the first sub-word of every word; derived from `labels != -100`
            when omitted.
        labels: (B, T) tag ids at first sub-words, -100 elsewhere.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(
                f"labels must have the shape of input_ids {tuple(input_ids.shape)} (one entry per token, -100 off "
                f"first sub-words), got {tuple(labels.shape)}"
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
            pixel_values=pixel_values,
            object_pixel_values=object_pixel_values,
            image_mask=image_mask,
            object_mask=object_mask,
            output_hidden_states=output_hidden_states,
            output_gate_weights=output_gate_weights,
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

        output = HVPNetTokenClassifierOutput(
            loss=loss,
            logits=emissions,
            predicted_tags=predicted_tags,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            gate_weights=outputs.gate_weights,
        )
        return output if return_dict else output.to_tuple()


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

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        object_pixel_values: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        object_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_gate_weights: bool = False,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput | tuple:
        """labels: (B,) relation ids."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if labels is not None and labels.shape != input_ids.shape[:1]:
            raise ValueError(f"labels must have shape ({input_ids.shape[0]},), got {tuple(labels.shape)}")
        outputs = self.hvpnet(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            pixel_values=pixel_values,
            object_pixel_values=object_pixel_values,
            image_mask=image_mask,
            object_mask=object_mask,
            output_hidden_states=output_hidden_states,
            output_gate_weights=output_gate_weights,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        if self.config.relation_pooling == "cls":
            features = hidden[:, 0]
        else:
            rows = torch.arange(len(hidden), device=hidden.device)
            head = self._marker_positions(input_ids, self.config.head_start_token_id, "head_start_token_id (<s>)")
            tail = self._marker_positions(input_ids, self.config.tail_start_token_id, "tail_start_token_id (<o>)")
            features = torch.cat([hidden[rows, head], hidden[rows, tail]], dim=-1)
        logits = self.classifier(self.dropout(features))

        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.float(), labels)  # float32 also under autocast
        output = SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        if output_gate_weights:
            output["gate_weights"] = outputs.gate_weights
        return output if return_dict else output.to_tuple()

    @staticmethod
    def _marker_positions(input_ids: torch.Tensor, marker_id: int | None, name: str) -> torch.Tensor:
        """(B,) position of the first `marker_id` in every row; a row without it is an error."""
        if marker_id is None:
            raise ValueError(f"config.{name} is not set; take it from the processor's tokenizer")
        is_marker = input_ids == marker_id
        missing = (~is_marker.any(dim=1)).nonzero().flatten().tolist()
        if missing:
            raise ValueError(f"RE input rows {missing} lack the entity marker {name} = {marker_id}")
        return is_marker.int().argmax(dim=1)


__all__ = [
    "HVPNetForSequenceClassification",
    "HVPNetForTokenClassification",
    "HVPNetModel",
    "HVPNetPreTrainedModel",
    "HVPNetSelfAttention",
    "HVPNetVisualPrefixEncoder",
]
