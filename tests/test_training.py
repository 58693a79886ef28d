"""HVPNetTrainer: the task head's and the visual prefix's own learning rates, their parameter groups, schedule and
checkpoints; length grouping for training with evaluation in the dataset's order."""

import os
import platform
import resource
import subprocess
import sys

import pytest
import torch
from modeling_utils import tiny_config, tiny_inputs, tiny_task_model
from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

from hvpnet_hf import HVPNetDataCollator, HVPNetForSequenceClassification, HVPNetForTokenClassification, HVPNetModel
from hvpnet_hf.training import (
    HVPNetTrainer,
    HVPNetTrainingArguments,
    fsdp_ignored_backbone,
    head_parameter_names,
    prefix_parameter_names,
)

BODY_LR, HEAD_LR, PREFIX_LR, WEIGHT_DECAY = 1e-4, 5e-2, 1e-3, 0.01


def relation_examples(count: int = 8) -> list[dict[str, torch.Tensor]]:
    """`count` single examples of random text and images, each with a relation label."""
    inputs = tiny_inputs(batch_size=count, text_length=7)
    return [
        {**{key: value[index] for key, value in inputs.items()}, "labels": torch.tensor(index % 5)}
        for index in range(count)
    ]


def relation_trainer(tmp_path, config_overrides: dict | None = None, **overrides) -> HVPNetTrainer:
    torch.manual_seed(0)
    model = HVPNetForSequenceClassification(tiny_config(relation_pooling="cls", **(config_overrides or {})))
    settings = {
        "output_dir": str(tmp_path),
        "learning_rate": BODY_LR,
        "head_learning_rate": HEAD_LR,
        "weight_decay": WEIGHT_DECAY,
        "per_device_train_batch_size": 4,
        "max_steps": 2,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "dataloader_pin_memory": False,
    }
    args = HVPNetTrainingArguments(**{**settings, **overrides})
    return HVPNetTrainer(model=model, args=args, train_dataset=relation_examples())


def test_head_is_everything_outside_the_base_model():
    ner = HVPNetForTokenClassification(tiny_config())
    assert {name.split(".")[0] for name in head_parameter_names(ner)} == {"classifier", "crf"}
    assert "crf.transitions" in head_parameter_names(ner)
    relation = HVPNetForSequenceClassification(tiny_config(relation_pooling="cls"))
    assert head_parameter_names(relation) == {"classifier.weight", "classifier.bias"}
    with pytest.raises(ValueError, match="no base model"):
        head_parameter_names(HVPNetModel(tiny_config()))


def named_groups(trainer: HVPNetTrainer) -> list[tuple[float, float, set[str]]]:
    """(lr, weight decay, parameter names) of every group of the trainer's optimizer, in order."""
    optimizer = trainer.create_optimizer()
    names = {id(parameter): name for name, parameter in trainer.model.named_parameters()}
    return [
        (group["lr"], group["weight_decay"], {names[id(parameter)] for parameter in group["params"]})
        for group in optimizer.param_groups
    ]


def expected_groups(*rates: float) -> list[tuple[float, float]]:
    """(learning rate, weight decay) of the groups, in order: each part with, then without, weight decay."""
    return [(rate, decay) for rate in rates for decay in (WEIGHT_DECAY, 0.0)]


def test_negative_head_or_prefix_learning_rates_are_refused(tmp_path):
    for name in ("head_learning_rate", "prefix_learning_rate"):
        with pytest.raises(ValueError, match=f"{name} must be at least 0, got -0.001"):
            HVPNetTrainingArguments(output_dir=str(tmp_path), **{name: -1e-3})


def assert_each_trainable_parameter_in_one_group(trainer: HVPNetTrainer, groups: list) -> None:
    grouped = [name for _, _, group_names in groups for name in group_names]
    trainable = {name for name, parameter in trainer.model.named_parameters() if parameter.requires_grad}
    assert len(grouped) == len(set(grouped)) and set(grouped) == trainable


def test_groups_cross_body_and_head_with_decay_and_frozen_backbone_stays_out(tmp_path):
    trainer = relation_trainer(tmp_path)
    model = trainer.model
    groups = named_groups(trainer)
    assert [(lr, decay) for lr, decay, _ in groups] == expected_groups(BODY_LR, HEAD_LR)
    assert groups[2][2] == {"classifier.weight"} and groups[3][2] == {"classifier.bias"}
    body_no_decay = groups[1][2]
    assert body_no_decay and all("bias" in name or "LayerNorm" in name for name in body_no_decay)
    assert_each_trainable_parameter_in_one_group(trainer, groups)
    frozen = {name for name, parameter in model.named_parameters() if not parameter.requires_grad}
    assert frozen and all(".backbone." in name for name in frozen)  # the frozen vision backbone


def test_prefix_groups_hold_every_trained_parameter_under_the_visual_encoder(tmp_path):
    trainer = relation_trainer(tmp_path, prefix_learning_rate=PREFIX_LR)
    groups = named_groups(trainer)
    assert [(lr, decay) for lr, decay, _ in groups] == expected_groups(BODY_LR, HEAD_LR, PREFIX_LR)
    prefix = groups[4][2] | groups[5][2]
    under_encoder = {
        name
        for name, parameter in trainer.model.named_parameters()
        if name.startswith("hvpnet.visual_encoder.") and parameter.requires_grad
    }
    assert prefix == under_encoder
    assert {name.split(".")[2] for name in prefix} == {"stage_projections", "gate", "key_value_projections"}
    assert groups[5][2] == {name for name in prefix if name.endswith(".bias")}
    assert_each_trainable_parameter_in_one_group(trainer, groups)  # the frozen backbone in none


def test_trained_backbone_and_prefix_move_at_the_prefix_learning_rate(tmp_path):
    # Without a head rate the head stays in the body. A trained backbone is part of the prefix's groups; after one
    # AdamW step without weight decay every parameter with a gradient has moved by its group's learning rate.
    settings = {"max_steps": 1, "weight_decay": 0.0, "lr_scheduler_type": "constant", "head_learning_rate": None}
    trainer = relation_trainer(tmp_path, {"freeze_vision": False}, prefix_learning_rate=PREFIX_LR, **settings)
    model = trainer.model
    groups = named_groups(trainer)
    assert [lr for lr, _, _ in groups] == [BODY_LR, BODY_LR, PREFIX_LR, PREFIX_LR]
    assert {"classifier.weight", "classifier.bias"} <= groups[0][2] | groups[1][2]
    backbone = {name for name in prefix_parameter_names(model) if ".backbone." in name}
    assert backbone and backbone <= groups[2][2] | groups[3][2]
    assert_each_trainable_parameter_in_one_group(trainer, groups)

    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    trainer.train()
    moved = {
        name: (parameter.detach() - before[name]).abs().max().item() for name, parameter in model.named_parameters()
    }
    # At most the learning rate (less where a gradient is not far above eps, as in parts of the tiny backbone): the
    # prefix and the backbone at the prefix's, the head at the body's; the gate further than the body's rate allows.
    prefix = groups[2][2] | groups[3][2]
    assert max(moved[name] for name in prefix) == pytest.approx(PREFIX_LR, rel=1e-4)
    assert max(moved[name] for name in backbone) == pytest.approx(PREFIX_LR, rel=1e-2)
    assert all(moved[name] <= PREFIX_LR * (1 + 1e-4) for name in prefix)
    assert moved["hvpnet.visual_encoder.gate.weight"] > 5 * BODY_LR
    assert moved["classifier.weight"] == pytest.approx(BODY_LR, rel=1e-4)


def test_prefix_learning_rate_needs_a_visual_prefix(tmp_path):
    trainer = relation_trainer(tmp_path, {"use_visual_prefix": False}, prefix_learning_rate=PREFIX_LR)
    with pytest.raises(ValueError, match="HVPNetForSequenceClassification has no visual encoder"):
        trainer.create_optimizer()


def test_without_head_or_prefix_learning_rate_it_is_the_plain_trainer(tmp_path):
    trainer = relation_trainer(tmp_path, head_learning_rate=None)
    plain = Trainer(model=trainer.model, args=trainer.args)
    ours, theirs = trainer.create_optimizer(), plain.create_optimizer()
    assert [(group["lr"], group["weight_decay"], len(group["params"])) for group in ours.param_groups] == [
        (group["lr"], group["weight_decay"], len(group["params"])) for group in theirs.param_groups
    ]


def test_head_moves_at_its_learning_rate_and_the_schedule_scales_every_group(tmp_path):
    # With weight decay 0 and a constant schedule, AdamW's first step moves every parameter with a non-zero gradient
    # by lr * g / (|g| + eps): the learning rate itself, up to eps = 1e-8 against gradients far larger.
    trainer = relation_trainer(tmp_path, max_steps=1, weight_decay=0.0, lr_scheduler_type="constant")
    model = trainer.model
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    trainer.train()
    moved = {
        name: (parameter.detach() - before[name]).abs().max().item() for name, parameter in model.named_parameters()
    }
    assert moved["classifier.weight"] == pytest.approx(HEAD_LR, rel=1e-4)
    assert moved["hvpnet.text_model.embeddings.word_embeddings.weight"] == pytest.approx(BODY_LR, rel=1e-4)

    # Linear warm-up then decay: after each step every group's learning rate is its peak times the same factor.
    factors = []

    class RecordFactors(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            learning_rates = [group["lr"] for group in optimizer.param_groups]
            factors.append((learning_rates[0] / BODY_LR, learning_rates[-1] / HEAD_LR))

    trainer = relation_trainer(tmp_path, max_steps=4, warmup_steps=2)
    trainer.add_callback(RecordFactors())
    trainer.train()
    assert [body for body, _ in factors] == pytest.approx([0.5, 1.0, 0.5, 0.0])  # up over 2 steps, down over 2
    assert [head for _, head in factors] == pytest.approx([body for body, _ in factors])


def test_optimizer_state_survives_a_checkpoint(tmp_path):
    settings = {"save_strategy": "steps", "save_steps": 2, "lr_scheduler_type": "constant"}
    relation_trainer(tmp_path, **settings).train()
    checkpoint = tmp_path / "checkpoint-2"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert [group["lr"] for group in saved["param_groups"]] == [BODY_LR, BODY_LR, HEAD_LR, HEAD_LR]

    resumed = relation_trainer(tmp_path, **settings, max_steps=3)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 3
    assert [group["lr"] for group in resumed.optimizer.param_groups] == [BODY_LR, BODY_LR, HEAD_LR, HEAD_LR]
    loaded_steps = {value["step"].item() for value in resumed.optimizer.state_dict()["state"].values()}
    assert loaded_steps == {3.0}  # two steps loaded from the checkpoint, one more after resuming


def test_length_grouped_training_keeps_evaluation_in_the_dataset_order(tmp_path):
    # 24 NER examples of 1 to 24 words in a shuffled order, so that any batching by length would reorder them.
    model, processor = tiny_task_model("ner")
    generator = torch.Generator().manual_seed(0)
    word_counts = (torch.randperm(24, generator=generator) + 1).tolist()
    words = [[f"word{index}"] * count for index, count in enumerate(word_counts)]
    tags = [
        torch.randint(0, len(model.config.id2label), (count,), generator=generator).tolist() for count in word_counts
    ]
    encoded = processor.encode_ner(words, tags)
    image_slots = 1 + processor.image_processor.num_object_images
    examples = [
        {
            **{name: values[index] for name, values in encoded.items()},
            "pixel_values": torch.zeros(image_slots, 3, 32, 32),
            "image_mask": torch.zeros(image_slots, dtype=torch.bool),
        }
        for index in range(len(words))
    ]
    args = HVPNetTrainingArguments(
        output_dir=str(tmp_path),
        train_sampling_strategy="group_by_length",
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        max_steps=2,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_pin_memory=False,
    )
    trainer = HVPNetTrainer(
        model=model,
        args=args,
        train_dataset=examples,
        processing_class=processor,
        data_collator=HVPNetDataCollator(processor),
    )
    assert isinstance(trainer._get_train_sampler(), LengthGroupedSampler)
    trainer.train()

    label_ids = trainer.predict(examples).label_ids
    assert len(label_ids) == len(examples)
    for row, example in zip(label_ids, examples, strict=True):
        length = len(example["labels"])
        assert row[:length].tolist() == example["labels"]
        assert (row[length:] == -100).all()


def test_bf16_training_holds_the_frozen_backbone_in_bf16_and_keeps_the_rest_float32(tmp_path):
    trainer = relation_trainer(tmp_path, bf16=True, head_learning_rate=None)
    model = trainer.model
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    trainer.train()
    dtypes = {name: parameter.dtype for name, parameter in model.named_parameters()}
    assert {dtype for name, dtype in dtypes.items() if ".backbone." in name} == {torch.bfloat16}
    assert {dtype for name, dtype in dtypes.items() if ".backbone." not in name} == {torch.float32}
    trained = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert all(not torch.equal(before[name], model.get_parameter(name)) for name in trained[-4:])
    assert trainer.state.log_history[-1]["train_loss"] > 0


def test_bf16_training_leaves_a_trainable_backbone_alone(tmp_path):
    torch.manual_seed(0)
    model = HVPNetForSequenceClassification(tiny_config(relation_pooling="cls", freeze_vision=False))
    args = HVPNetTrainingArguments(output_dir=str(tmp_path), bf16=True, use_cpu=True, report_to="none")
    HVPNetTrainer(model=model, args=args)
    assert {parameter.dtype for parameter in model.parameters()} == {torch.float32}


# A child process: four rounds of allocating ten blocks of `floats` float32 values (as a step allocates its gradients)
# and freeing them all; prints whether the setting was applied and the pages the rounds after the first faulted in.
REUSE_PROBE = """
import resource, sys, torch
from hvpnet_hf.training import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
floats = int(sys.argv[2])
faults = []
for _ in range(4):
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.ones(floats) for _ in range(10)]
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
    del blocks
print(applied, sum(faults[1:]))
"""
SMALL_BLOCK, LARGE_BLOCK = 2_000_000, 12_000_000  # 8 MB, and 48 MB: over glibc's largest mmap threshold (32 MiB)


def round_pages(floats: int) -> int:
    return 10 * floats * 4 // resource.getpagesize()


def _faults_after_first_round(mode: str, floats: int = SMALL_BLOCK, **environment: str) -> tuple[str, int]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_")} | environment
    result = subprocess.run(
        [sys.executable, "-c", REUSE_PROBE, mode, str(floats)], capture_output=True, text=True, check=True, env=env
    )
    applied, faults = result.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")
@pytest.mark.parametrize("floats", [SMALL_BLOCK, LARGE_BLOCK], ids=["8MB", "48MB"])
def test_keep_freed_memory_lets_later_rounds_reuse_the_freed_blocks(floats):
    # By default glibc hands freed blocks back (unmapped, or trimmed off its heap) and a round faults their pages in
    # anew, one fault per page; whether it can trim depends on where other small allocations landed, so some
    # rounds reuse the blocks: at least one of the 3 after the first faults them in. Kept, none does, also for
    # blocks that glibc would map fresh at any mmap threshold (a few pages differ: aligned allocations do not
    # always fit a freed block exactly; about a tenth of a round seen).
    applied, default_faults = _faults_after_first_round("default", floats)
    assert default_faults > round_pages(floats) // 2, (
        f"the default allocator already reused the blocks ({default_faults})"
    )
    applied, kept_faults = _faults_after_first_round("keep", floats)
    assert applied == "True"
    assert kept_faults < round_pages(floats) // 4, (
        f"{kept_faults} page faults in rounds that should reuse freed blocks"
    )


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")
def test_keep_freed_memory_leaves_a_process_that_chose_its_own_setting():
    # A threshold from the environment turns glibc's adjustment of both off: every 8 MB block is mapped fresh.
    applied, faults = _faults_after_first_round("keep", MALLOC_TRIM_THRESHOLD_="0")
    assert applied == "False"
    assert faults > 2 * round_pages(SMALL_BLOCK), "the environment's own setting was overridden"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")
@pytest.mark.parametrize("variable", ["MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"])
def test_keep_freed_memory_defers_to_each_allocator_variable(variable):
    # Each of glibc's variables for what the call sets: a process that set one chose its allocator.
    applied, _ = _faults_after_first_round("keep", **{variable: "0"})
    assert applied == "False", f"{variable} in the environment was overridden"


def test_fsdp_leaves_out_a_frozen_backbone_only():
    frozen = HVPNetForSequenceClassification(tiny_config(relation_pooling="cls"))
    assert fsdp_ignored_backbone(frozen) == [frozen.hvpnet.visual_encoder.backbone]
    trained = HVPNetForSequenceClassification(tiny_config(relation_pooling="cls", freeze_vision=False))
    assert fsdp_ignored_backbone(trained) is None


def test_training_never_moves_the_frozen_backbone_statistics(tmp_path):
    # `Trainer` sets the model to training mode at every step; the frozen backbone's BatchNorms must stay in eval mode.
    trainer = relation_trainer(tmp_path)
    backbone = trainer.model.hvpnet.visual_encoder.backbone
    before = {name: buffer.clone() for name, buffer in backbone.named_buffers()}
    trainer.train()
    assert trainer.state.global_step == 2 and before
    assert all(torch.equal(buffer, before[name]) for name, buffer in backbone.named_buffers())


def test_gpu_check_dry_run_prints_its_checks_and_table():
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu_check.sh")
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    finished = subprocess.run(
        [script, "--dry_run", "--repeats", "1"], env=environment, capture_output=True, text=True, timeout=600
    )
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    assert finished.stdout.count(": pass (") == 5
    for measurement in ("train step fp32", "train step tf32", "train step bf16", "inference bf16"):
        assert f"| tiny | {measurement} |" in finished.stdout
