"""What a text encoder and an image backbone cost: train-step time and peak memory per (encoder, backbone) pair.

Settings (paper appendix B): batch 8, text padded to 80 tokens, 1 global image + 3 crops at 224 px, the NER head
with its CRF, the frozen backbone (`freeze_vision=True`, the default) run in calls of 8 images, and the optimizer
`Trainer` builds by default (fused AdamW). Weights are random (nothing is downloaded). The encoders have the sizes
of the named checkpoints, their vocabularies included (XLM-R's 250,002 rows are 256M of its 560M parameters, and
AdamW keeps two more copies of them). Each backbone reads its default levels (`vision_out_indices=None`): resnet50's
four stages (the paper's), blocks 3, 6, 9, 12 of a ViT-B/16 or ViT-B/32 (CLIP's architecture), Swin-T's four stages.

| configuration | what it varies |
| --- | --- |
| bert-base + resnet50 | the paper's pair, the reference of the ratios |
| roberta-base + resnet50 | a larger vocabulary (50,265 rows), same encoder size |
| xlm-roberta-large + resnet50 | a 24-layer, 1024-wide encoder and a 250,002-row vocabulary |
| bert-base + vit_base_patch16_clip_224 | a plain ViT, 196 patches per image |
| bert-base + vit_base_patch32_clip_224 | a plain ViT, 49 patches per image |
| bert-base + swin_tiny_patch4_window7_224 | a hierarchical transformer with channels-last maps |

Every configuration runs in a fresh subprocess, so its peak memory (max RSS, model and optimizer state included) is
its own; each row is printed when its subprocess ends.

    python benchmarks/bench_encoders.py [--repeats 2] [--configurations "bert-base + resnet50" ...]

Timings are means over `--repeats` steps after one warm-up. Compare the ratios of one run: absolute times depend on
the machine and its load.
"""

import argparse
import json

import bench_utils
import torch
from bench_utils import BATCH_SIZE, IMAGE_SIZE, NUM_OBJECTS, TEXT_LENGTH

NUM_LABELS = 9  # the MNER BIO tags of four entity types
# The text encoders, as `text_config` dicts with the sizes of the public checkpoints of those names.
ENCODERS = {
    "bert-base": {"model_type": "bert"},
    "roberta-base": {
        "model_type": "roberta", "vocab_size": 50265, "max_position_embeddings": 514, "type_vocab_size": 1,
        "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
    },
    "xlm-roberta-large": {
        "model_type": "xlm-roberta", "vocab_size": 250002, "hidden_size": 1024, "num_hidden_layers": 24,
        "num_attention_heads": 16, "intermediate_size": 4096, "max_position_embeddings": 514, "type_vocab_size": 1,
        "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
    },
}  # fmt: skip
# The measured (encoder, timm backbone) pairs, in the order of the table above; the first is the reference.
CONFIGURATIONS = [
    ("bert-base", "resnet50"),
    ("roberta-base", "resnet50"),
    ("xlm-roberta-large", "resnet50"),
    ("bert-base", "vit_base_patch16_clip_224"),
    ("bert-base", "vit_base_patch32_clip_224"),
    ("bert-base", "swin_tiny_patch4_window7_224"),
]


def configuration_name(encoder: str, backbone: str) -> str:
    return f"{encoder} + {backbone}"


def random_batch(generator: torch.Generator, vocabulary: int) -> dict:
    """Random model inputs for one batch: `TEXT_LENGTH` tokens of the encoder's vocabulary, every image present."""
    slots = 1 + NUM_OBJECTS
    return {
        "input_ids": torch.randint(5, vocabulary, (BATCH_SIZE, TEXT_LENGTH), generator=generator),
        "attention_mask": torch.ones(BATCH_SIZE, TEXT_LENGTH, dtype=torch.long),
        "labels": torch.randint(0, NUM_LABELS, (BATCH_SIZE, TEXT_LENGTH), generator=generator),
        "pixel_values": torch.randn(BATCH_SIZE, slots, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator),
        "image_mask": torch.ones(BATCH_SIZE, slots, dtype=torch.bool),
    }


def run_worker(encoder: str, backbone: str, repeats: int) -> dict:
    """One configuration in this process: mean train-step seconds, peak RSS, parameter counts and the levels."""
    from hvpnet_hf import HVPNetConfig, HVPNetForTokenClassification, speed_up_frozen_backbone

    torch.manual_seed(0)
    config = HVPNetConfig(
        text_config=ENCODERS[encoder],
        vision_backbone=backbone,
        num_object_images=NUM_OBJECTS,
        num_labels=NUM_LABELS,
        vision_chunk_size=8,
    )
    model = HVPNetForTokenClassification(config)
    speed_up_frozen_backbone(model)  # as `HVPNetTrainer` runs it
    step = bench_utils.train_step(model)
    generator = torch.Generator().manual_seed(0)
    vocabulary = config.text_config.vocab_size
    seconds = bench_utils.mean_seconds(step, [lambda: random_batch(generator, vocabulary)] * (repeats + 1))
    return {
        "seconds": seconds,
        "peak_rss_gib": bench_utils.peak_rss_gib(),
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
        "trained": sum(parameter.numel() for parameter in bench_utils.trained_parameters(model)),
        "backbone": sum(parameter.numel() for parameter in model.hvpnet.visual_encoder.backbone.parameters()),
        "levels": list(model.hvpnet.visual_encoder.backbone.feature_info.out_indices),
    }


def main() -> None:
    names = {configuration_name(*pair): pair for pair in CONFIGURATIONS}
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per configuration (after one warm-up)")
    parser.add_argument(
        "--configurations", nargs="+", default=list(names), choices=list(names), help="the first is the reference"
    )
    parser.add_argument("--worker", nargs=2, metavar=("ENCODER", "BACKBONE"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(run_worker(*args.worker, args.repeats)))
        return

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, repeats={args.repeats}: train step at batch "
        f"{BATCH_SIZE} x {TEXT_LENGTH} tokens, {1 + NUM_OBJECTS} images of {IMAGE_SIZE} px, random weights"
    )
    print(
        f"\n{'configuration':42s} {'params':>7s} {'trained':>7s} {'backbone':>8s} {'levels':>13s} "
        f"{'train s':>8s} {'ratio':>6s} {'GiB':>6s}"
    )
    reference = None
    for name in args.configurations:  # each row is printed as soon as its subprocess ends
        row = bench_utils.run_in_subprocess(__file__, ["--repeats", str(args.repeats), "--worker", *names[name]])
        reference = reference or row
        print(
            f"{name:42s} {row['parameters'] / 1e6:6.0f}M {row['trained'] / 1e6:6.0f}M {row['backbone'] / 1e6:7.1f}M "
            f"{','.join(map(str, row['levels'])):>13s} {row['seconds']:8.2f} "
            f"{row['seconds'] / reference['seconds']:5.2f}x {row['peak_rss_gib']:6.2f}",
            flush=True,
        )
    print(
        f"(ratio: step time over '{args.configurations[0]}'; levels: the backbone's feature levels the prefix reads; "
        "GiB: peak RSS of the process, optimizer state included)"
    )


if __name__ == "__main__":
    main()
