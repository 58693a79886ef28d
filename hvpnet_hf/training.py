"""
`Trainer` support for separate learning rates on the task head (the CRF and emission layer for NER, the relation
classifier for MRE), as the authors' released HVPNeT trainer optimizes the CRF and emission layer at 5e-2, and on
the visual prefix (the modules under the visual encoder, which start from random weights); for length-grouped
training batches with evaluation kept in the dataset's order; for a frozen backbone under FSDP (left out of
sharding) and whole-model saves beside FSDP's sharded checkpoints; and the C allocator setting that the example
training scripts start with (`keep_freed_memory`).
"""

import ctypes
import ctypes.util
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Sampler, SequentialSampler
from transformers import PreTrainedModel, Trainer, TrainingArguments
from transformers.trainer_utils import has_length

from .frozen_backbone import speed_up_frozen_backbone, warn_if_bfloat16_is_emulated
from .modeling_hvpnet import HVPNetForTokenClassification


@dataclass
class HVPNetTrainingArguments(TrainingArguments):
    """`TrainingArguments` with `head_learning_rate` and `prefix_learning_rate`: the peak learning rates of the task
    head and of the visual prefix."""

    head_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Peak learning rate of the task head (NER: CRF and emission layer; RE: relation classifier); "
            "default: learning_rate. The warm-up and decay schedule applies to it as to every other parameter."
        },
    )
    prefix_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Peak learning rate of the visual prefix: every trained parameter under the visual encoder (stage "
            "projections, gates, key/value projections, the backbone when it is trained); default: learning_rate. "
            "The warm-up and decay schedule applies to it as to every other parameter."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        for name in ("head_learning_rate", "prefix_learning_rate"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be at least 0, got {value}")


# glibc's mallopt parameters (malloc.h) and the values `keep_freed_memory` gives them.
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
KEPT_TOP_BYTES = 2**31 - 1  # mallopt takes an int
MALLOC_VARIABLES = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep the memory the process frees, to hand out again, instead of giving it back to the
    system. Returns whether it did.

    By default glibc maps every block over its mmap threshold (at most 32 MiB) fresh from the system and unmaps it
    when it is freed, and it gives back the free top of its heap; a training step frees its gradients and
    activations, so the next step faults the same memory in again, and at the paper's settings the (30522, 768)
    word-embedding gradient alone, 94 MB zero-filled every step, took 7% of a step. Here blocks of every size come
    from the heap (no mmap) and the heap keeps up to 2 GiB of free top: at the paper's settings a training step then
    faults in a fraction of the pages and runs faster, at about the same peak memory (measured in
    `docs/fast-epochs.md`, with `benchmarks/bench_original.py`). A setting of the whole process, so the library
    never makes it on import: the example training scripts call this when they train. Nothing changes where the
    process's environment already sets one of `MALLOC_VARIABLES` (the process chose), or where the C library is not
    glibc.
    """
    if any(variable in os.environ for variable in MALLOC_VARIABLES):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):  # no C library found, or one without glibc's mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, KEPT_TOP_BYTES))


def head_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters outside the base model (`model.base_model_prefix`): the task head."""
    prefix = getattr(model, "base_model_prefix", "")
    if not prefix or not isinstance(getattr(model, prefix, None), nn.Module):
        raise ValueError(
            f"{type(model).__name__} has no base model, so it has no separate head to give a learning rate"
        )
    return {name for name, _ in model.named_parameters() if not name.startswith(f"{prefix}.")}


def prefix_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters under the base model's visual encoder: the visual prefix (and its backbone)."""
    encoder = getattr(getattr(model, "base_model", None), "visual_encoder", None)
    if not isinstance(encoder, nn.Module):
        raise ValueError(
            f"{type(model).__name__} has no visual encoder, so it has no visual prefix to give a learning rate"
        )
    owned = {id(parameter) for parameter in encoder.parameters()}
    return {name for name, parameter in model.named_parameters() if id(parameter) in owned}


def fsdp_ignored_backbone(model: nn.Module) -> list[nn.Module] | None:
    """The modules FSDP leaves unsharded in `model`: its vision backbone when frozen ([backbone]), else None.

    A frozen backbone takes no gradient and no optimizer state, so sharding it saves only its weights, at the cost of
    gathering them at every step; left out, it also keeps FSDP1's flat parameters of uniform `requires_grad` and
    FSDP2's groups of one dtype (a backbone held in bfloat16 beside float32 trained weights)."""
    encoder = getattr(getattr(model, "base_model", None), "visual_encoder", None)
    return [encoder.backbone] if encoder is not None and encoder.freeze_backbone else None


class HVPNetTrainer(Trainer):
    """
    A `Trainer` that, given `HVPNetTrainingArguments.head_learning_rate` or `prefix_learning_rate`, optimizes the task
    head or the visual prefix at that learning rate. The parameters form up to six groups, body / head / prefix crossed
    with weight decay / none (biases and normalization weights, as `Trainer.get_decay_parameter_names` decides); a
    part without its own learning rate stays in the body, and frozen parameters are in no group. Body groups come
    first, so the logged `learning_rate` is the body's. Without either learning rate it is `Trainer` unchanged.

    Evaluation and prediction always read the dataset in its order, also with
    `train_sampling_strategy="group_by_length"` (which groups the training batches by length). For an NER model
    their predictions are the CRF's tags (`HVPNetForTokenClassification.decode`): (B, T) tag ids at first sub-words
    and -100 elsewhere, which `compute_metrics` receives (and `align_word_predictions` reads).

    A frozen backbone runs sped up (`speed_up_frozen_backbone`: the same outputs up to float32 rounding), and with
    `bf16=True` it is held in bfloat16, as autocast would compute its convolutions in bfloat16 anyway, after casting
    every frozen weight again on every call; checkpoints then store the backbone in bfloat16. With `bf16=True` on a
    CPU without bfloat16 instructions, a warning says that torch emulates it.

    Under FSDP (accelerate's FSDP plugin, version 1 or 2) a frozen backbone is left out of sharding: every process
    keeps it whole, in eval mode, and no step gathers it (`fsdp_ignored_backbone`). With sharded checkpoints
    (`SHARDED_STATE_DICT`), which resume a run, every save also writes the model whole, so that each checkpoint and
    the final folder load with `from_pretrained`.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        encoder = getattr(getattr(self.model, "base_model", None), "visual_encoder", None)
        if encoder is not None and encoder.freeze_backbone:
            speed_up_frozen_backbone(self.model, dtype=torch.bfloat16 if self.args.bf16 else None)
        if self.args.bf16:
            warn_if_bfloat16_is_emulated(self.args.device)
        fsdp_plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        ignored = fsdp_ignored_backbone(self.model)
        if fsdp_plugin is not None and ignored is not None:
            fsdp_plugin.ignored_modules = ignored

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        fsdp_plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        if fsdp_plugin is not None and "FULL_STATE_DICT" not in str(fsdp_plugin.state_dict_type):
            # `Trainer` writes only the shards here; gathering the whole state dict takes every process.
            self._save(output_dir, state_dict=self.accelerator.get_state_dict(self.model))
        super().save_model(output_dir, _internal_call)

    def _get_eval_sampler(self, eval_dataset: Dataset) -> Sampler | None:
        # `Trainer` groups evaluation batches by length too under "group_by_length", so its predictions come back
        # permuted. The metrics and prediction files pair the i-th prediction with the i-th example of the split
        # (gold word tags, words, relation spans), so here evaluation keeps `Trainer`'s default order: sequential
        # on one process; under several, None lets accelerate shard in order and gather back in order.
        if eval_dataset is None or not has_length(eval_dataset) or self.args.world_size > 1:
            return None
        return SequentialSampler(eval_dataset)

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        ner_model = self.accelerator.unwrap_model(model)
        if logits is None or not isinstance(ner_model, HVPNetForTokenClassification):
            return loss, logits, labels
        emissions = logits[0] if isinstance(logits, tuple) else logits  # with hidden states or gates, logits first
        word_start_mask = inputs.get("word_start_mask")
        if word_start_mask is None:
            word_start_mask = inputs["labels"] != -100
        return loss, ner_model.decode(emissions, word_start_mask), labels

    def create_optimizer(self, model: PreTrainedModel | None = None) -> torch.optim.Optimizer:
        rates = {
            "head": getattr(self.args, "head_learning_rate", None),
            "prefix": getattr(self.args, "prefix_learning_rate", None),
        }
        if self.optimizer is not None or all(rate is None for rate in rates.values()):
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        decay_names = set(self.get_decay_parameter_names(opt_model))
        finders = {"head": head_parameter_names, "prefix": prefix_parameter_names}
        owners = {part: finders[part](opt_model) for part, rate in rates.items() if rate is not None}
        parts = {"body": [], "head": [], "prefix": []}  # (name, parameter) of each part, in the model's order
        for name, parameter in opt_model.named_parameters():
            if parameter.requires_grad:
                part = next((part for part, names in owners.items() if name in names), "body")
                parts[part].append((name, parameter))
        groups = []
        for part, named in parts.items():  # the body first: its learning rate is the one logged
            for decays in (True, False):
                params = [parameter for name, parameter in named if (name in decay_names) == decays]
                group = {"params": params, "weight_decay": self.args.weight_decay if decays else 0.0}
                if rates.get(part) is not None:
                    group["lr"] = rates[part]
                if params:
                    groups.append(group)
        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        replaced = {"params", "model", "optimizer_dict"} & set(optimizer_kwargs)
        if replaced or not isinstance(optimizer_cls, type) or not issubclass(optimizer_cls, torch.optim.Optimizer):
            given = " and ".join(f"{part}_learning_rate" for part, rate in rates.items() if rate is not None)
            raise ValueError(f"{given} needs a plain torch optimizer; optim={self.args.optim} is not one")
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer
