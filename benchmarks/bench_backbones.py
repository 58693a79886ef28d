"""Time a training step and measure its peak memory with each kind of vision backbone, at the paper's settings.

Settings (paper appendix B, as in `bench_train_step.py`): a bert-base-size text encoder, random weights, 1 global
image + 3 crops at 224 px, batch 8, text padded to 80 tokens, NER head with CRF, the frozen backbone
(`freeze_vision=True`, the default) run in calls of 8 images, and the optimizer `Trainer` builds by default. The
backbones are random too, each at its default levels (`vision_out_indices=None`): resnet50 (the paper's), a ViT-B/16
and a ViT-B/32 (CLIP's architecture, blocks 3, 6, 9, 12) and a Swin-T. Every backbone runs in a fresh subprocess, so
its peak memory (max RSS, model included) is its own; each row is printed when its subprocess ends.

    python benchmarks/bench_backbones.py [--repeats 2] [--backbones resnet50 vit_base_patch16_clip_224]

Timings are means over `--repeats` steps after one warm-up. Compare the ratios of one run: absolute times depend on
the machine and its load.
"""

import argparse
import json
import subprocess
import sys
import tempfile

import torch
from bench_train_step import BATCH_SIZE, IMAGE_SIZE, NUM_LABELS, NUM_OBJECTS, TEXT_LENGTH, mean_seconds, peak_rss_gib

BACKBONES = ("resnet50", "vit_base_patch16_clip_224", "vit_base_patch32_clip_224", "swin_tiny_patch4_window7_224")


def make_batch() -> dict:
    """Random model inputs for one batch: text of `TEXT_LENGTH` tokens, every image slot present."""
    slots = 1 + NUM_OBJECTS
    return {
        "input_ids": torch.randint(1000, 20000, (BATCH_SIZE, TEXT_LENGTH)),
        "attention_mask": torch.ones(BATCH_SIZE, TEXT_LENGTH, dtype=torch.long),
        "labels": torch.randint(0, NUM_LABELS, (BATCH_SIZE, TEXT_LENGTH)),
        "pixel_values": torch.randn(BATCH_SIZE, slots, 3, IMAGE_SIZE, IMAGE_SIZE),
        "image_mask": torch.ones(BATCH_SIZE, slots, dtype=torch.bool),
    }


def run_worker(backbone: str, repeats: int) -> dict:
    """One backbone in this process: mean train-step seconds, peak RSS, its levels and its size."""
    from transformers import Trainer, TrainingArguments

    from hvpnet_hf import HVPNetConfig, HVPNetForTokenClassification

    torch.manual_seed(0)
    model = HVPNetForTokenClassification(HVPNetConfig(vision_backbone=backbone, num_labels=NUM_LABELS)).train()
    with tempfile.TemporaryDirectory() as folder:
        optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(
            TrainingArguments(output_dir=folder, use_cpu=True, report_to="none")
        )
    optimizer = optimizer_cls(
        [parameter for parameter in model.parameters() if parameter.requires_grad], **optimizer_kwargs
    )

    def step(batch: dict) -> None:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    seconds = mean_seconds(step, [make_batch] * (repeats + 1))
    encoder = model.hvpnet.visual_encoder
    return {
        "seconds": seconds,
        "peak_rss_gib": peak_rss_gib(),
        "levels": model.config.vision_out_indices,
        "backbone_parameters": sum(parameter.numel() for parameter in encoder.backbone.parameters()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per backbone (after one warm-up)")
    parser.add_argument("--backbones", nargs="*", default=list(BACKBONES))
    parser.add_argument("--worker", metavar="BACKBONE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(args.worker, args.repeats)))
        return

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, repeats={args.repeats}, batch {BATCH_SIZE}")
    print(f"\n{'backbone':30s} {'params':>7s} {'levels':>15s} {'train s':>8s} {'ratio':>6s} {'GiB':>5s}")
    reference = None
    for backbone in args.backbones:  # each row is printed as soon as its subprocess ends
        command = [sys.executable, __file__, "--repeats", str(args.repeats), "--worker", backbone]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{backbone} failed:\n{result.stderr[-3000:]}")
        row = json.loads(result.stdout.strip().splitlines()[-1])
        reference = reference or row
        print(
            f"{backbone:30s} {row['backbone_parameters'] / 1e6:6.1f}M {str(row['levels']):>15s} "
            f"{row['seconds']:8.2f} {row['seconds'] / reference['seconds']:5.2f}x {row['peak_rss_gib']:5.2f}",
            flush=True,
        )
    print(f"(ratio: step time over {args.backbones[0]}'s; GiB: peak RSS of the process, model included)")


if __name__ == "__main__":
    main()
