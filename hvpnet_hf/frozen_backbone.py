"""
Speed-ups for running a frozen vision backbone, applied once, after loading, by the code that runs the model (the
pipelines, `HVPNetTrainer`, `VisualFeatureCache`); the model never applies them itself:

    model = HVPNetForTokenClassification.from_pretrained(folder)
    speed_up_frozen_backbone(model)

A frozen backbone runs in eval mode, so every BatchNorm that only normalizes a convolution's output is an affine map
with fixed statistics, which the convolution can apply to its weights instead of to its output maps
(`torch.nn.utils.fusion.fuse_conv_bn_weights`); and its convolutions can hold their weights in the `channels_last`
layout, which oneDNN and cuDNN then compute in (the input is converted by the first convolution). Neither changes
the saved weights: a transformed model saves the state dict of the model before, and gives its outputs up to float32
rounding. `docs/benchmarks.md` gives the effect of each speed-up.

Also here, because it concerns the speed of bfloat16 on a CPU: `warn_if_bfloat16_is_emulated`, called where bfloat16
is asked for (`HVPNetTrainer` with `bf16=True`, a pipeline built in bfloat16).

This module imports only torch and transformers: it is saved with a model's pipeline code.
"""

import platform
from collections import Counter
from dataclasses import dataclass
from functools import cache

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from transformers import PreTrainedModel
from transformers.utils import logging

logger = logging.get_logger(__name__)

# The side of the blank image that finds the folding pairs of a backbone without a fixed input size.
PAIR_FINDING_IMAGE_SIZE = 128


@dataclass(frozen=True)
class BackboneSpeedUps:
    """What `speed_up_frozen_backbone` did: `folded_norms`, how many BatchNorms run inside the convolution before
    them; `channels_last`, whether the convolution weights are held `channels_last`; `dtype`, the dtype of the
    backbone's weights (None where the model has no frozen backbone)."""

    folded_norms: int
    channels_last: bool
    dtype: torch.dtype | None


def speed_up_frozen_backbone(model: PreTrainedModel, dtype: torch.dtype | None = None) -> BackboneSpeedUps:
    """Fold the frozen backbone's BatchNorms into their convolutions and hold its convolution weights `channels_last`,
    in `dtype` when given (bfloat16 for bf16 training: autocast caches the casts of trainable weights only, so it
    would cast every frozen weight again on every call).

    Apply it after loading weights into `model`: loading copies into the weights in place and keeps their layout,
    but a load that replaces them (`assign=True`) brings back the saved layout (the outputs stay right). Apply it
    before threads share the model; once applied, nothing changes during a pass. Applying it again does nothing
    more. A model without a visual prefix, or whose backbone is trained, is left as it is; with `dtype`, that is an
    error.
    """
    encoder = getattr(model.base_model, "visual_encoder", None)
    if encoder is None or not encoder.freeze_backbone:
        if dtype is not None:
            raise ValueError(
                f"dtype={dtype}: only a frozen backbone (freeze_vision=True) can be held in another dtype"
            )
        return BackboneSpeedUps(folded_norms=0, channels_last=False, dtype=None)
    backbone = encoder.backbone
    backbone.to(dtype=dtype, memory_format=torch.channels_last)
    fold_batch_norms(backbone)
    folded = sum(isinstance(module, NormFoldedIntoConvolution) for module in backbone.modules())
    return BackboneSpeedUps(folded_norms=folded, channels_last=True, dtype=next(backbone.parameters()).dtype)


def fold_batch_norms(backbone: nn.Module) -> int:
    """Fold every BatchNorm of `backbone` (in eval mode) that only normalizes a convolution's output into that
    convolution; returns how many it folded. Both modules are replaced by ones that take over their parameters and
    buffers under the same names, so the state dict does not change and loading into them in place reaches the
    folded convolution; in training mode the pair computes as before."""
    pairs = _convolution_norm_pairs(backbone)
    for convolution_name, norm_name in pairs:
        norm = NormFoldedIntoConvolution.taking_over(backbone.get_submodule(norm_name))
        convolution = ConvolutionWithFoldedNorm.taking_over(backbone.get_submodule(convolution_name), norm)
        backbone.set_submodule(norm_name, norm)
        backbone.set_submodule(convolution_name, convolution)
    return len(pairs)


def _convolution_norm_pairs(backbone: nn.Module) -> list[tuple[str, str]]:
    """The names of the (Conv2d, BatchNorm2d) pairs where, in one pass of a blank image, the norm's input is the
    convolution's output, nothing else reads that output and each module runs once. Who reads a tensor is read from
    the autograd graph of that pass (the image requires grad), so finding them changes nothing outside this call and
    is safe while other threads run models. A backbone without such pairs (ViTs, Swin, ConvNeXt, EfficientNet's
    fused norm-activation layers) keeps all its norms."""
    names = {module: name for name, module in backbone.named_modules()}
    convolutions = [module for module in names if type(module) is nn.Conv2d]
    norms = [module for module in names if type(module) is nn.BatchNorm2d and module.affine and not module.training]
    if not convolutions or not norms:
        return []
    calls: Counter = Counter()
    made_by: dict[torch.autograd.graph.Node, nn.Module] = {}  # output node of each convolution call
    input_node: dict[nn.Module, torch.autograd.graph.Node | None] = {}  # the node that made each norm's input

    def record_convolution(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        calls[module] += 1
        made_by[output.grad_fn] = module

    def record_norm(module: nn.Module, args: tuple) -> None:
        calls[module] += 1
        input_node[module] = args[0].grad_fn

    handles = [module.register_forward_hook(record_convolution) for module in convolutions]
    handles += [module.register_forward_pre_hook(record_norm) for module in norms]
    parameter = next(backbone.parameters())
    timm_config = getattr(backbone, "pretrained_cfg", None) or {}
    size = timm_config["input_size"] if timm_config.get("fixed_input_size") else (3, *[PAIR_FINDING_IMAGE_SIZE] * 2)
    image = torch.zeros(1, *size, device=parameter.device, dtype=parameter.dtype, requires_grad=True)
    try:
        with torch.enable_grad():
            outputs = backbone(image)
    finally:
        for handle in handles:
            handle.remove()
    outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
    readers = _readers([output.grad_fn for output in outputs])
    return [
        (names[made_by[node]], names[norm])
        for norm, node in input_node.items()
        if node in made_by and calls[norm] == calls[made_by[node]] == 1 and readers[node] == 1
    ]


def _readers(roots: list[torch.autograd.graph.Node | None]) -> Counter:
    """How many times each node's output is read in the autograd graph below `roots`, the nodes of the tensors a
    caller receives (each read once by that caller)."""
    readers: Counter = Counter(node for node in roots if node is not None)
    stack, seen = list(readers), set(readers)
    while stack:
        for node, _ in stack.pop().next_functions:
            if node is not None:
                readers[node] += 1
                if node not in seen:
                    seen.add(node)
                    stack.append(node)
    return readers


class NormFoldedIntoConvolution(nn.BatchNorm2d):
    """A BatchNorm2d whose eval-mode affine map is applied by the convolution before it (`ConvolutionWithFoldedNorm`):
    it keeps its parameters and statistics and, in eval mode, passes its input on."""

    @classmethod
    def taking_over(cls, norm: nn.BatchNorm2d) -> "NormFoldedIntoConvolution":
        """The folded norm with `norm`'s parameters, buffers and marks (built on the meta device: nothing is copied)."""
        folded = cls(norm.num_features, eps=norm.eps, momentum=norm.momentum, device="meta")
        folded.weight, folded.bias = norm.weight, norm.bias
        folded.running_mean, folded.running_var = norm.running_mean, norm.running_var
        folded.num_batches_tracked = norm.num_batches_tracked
        folded.__dict__.update({name: value for name, value in vars(norm).items() if not name.startswith("_")})
        return folded.train(norm.training)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return super().forward(inputs) if self.training else inputs


class ConvolutionWithFoldedNorm(nn.Conv2d):
    """A Conv2d followed by its BatchNorm (running statistics) as one convolution, in eval mode. The norm stays a
    module of the backbone, where it owns its parameters; this one only reads them, at each call (folding them into
    the weights once would hold a second copy of the backbone)."""

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
        norm = self.folded_norm
        if norm.training:
            return super().forward(inputs)
        # In float32 also for a backbone held in bfloat16, then in the convolution's dtype.
        weight, bias = fuse_conv_bn_weights(
            self.weight,
            None if self.bias is None else self.bias.float(),
            norm.running_mean.float(),
            norm.running_var.float(),
            norm.eps,
            norm.weight.float(),
            norm.bias.float(),
        )
        return self._conv_forward(inputs, weight, bias.to(weight.dtype))


@cache
def cpu_computes_bfloat16_natively() -> bool:
    """Whether this CPU has bfloat16 instructions (on x86, AVX512-BF16 or AMX); without them torch emulates bfloat16,
    many times slower than float32 (`docs/benchmarks.md`). Other architectures are taken to have them (torch has no
    check for them)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def warn_if_bfloat16_is_emulated(device: torch.device) -> None:
    """Warn, once, that bfloat16 asked for on `device` is emulated: on a CPU without bfloat16 instructions."""
    if torch.device(device).type == "cpu" and not cpu_computes_bfloat16_natively():
        logger.warning_once(
            "This CPU has no bfloat16 instructions (AVX512-BF16 or AMX): torch emulates bfloat16 on it, many times "
            "slower than float32. Run in float32 here (no --bf16, dtype=torch.float32)."
        )


__all__ = ["BackboneSpeedUps", "speed_up_frozen_backbone", "warn_if_bfloat16_is_emulated"]
