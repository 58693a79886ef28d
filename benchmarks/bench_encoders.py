"""What a text encoder and a backbone cost: train-step time and peak memory per (encoder, backbone) configuration.

Settings (paper appendix B): batch 8, text padded to 80 tokens, 1 global image + 3 crops at 224 px, the NER head
with its CRF, a frozen backbone run in calls of 8 images, and the optimizer `Trainer` builds by default (fused
AdamW). Weights are random (nothing is downloaded); the encoders have the sizes of the named checkpoints, their
vocabularies included (XLM-R's 250,002 rows are 256M of its 560M parameters, and AdamW keeps two more copies of
them). Every configuration runs in a fresh subprocess, so its peak memory (max RSS, model and optimizer state
included) is its own.

    python benchmarks/bench_encoders.py [--repeats 2] [--configurations "bert-base + resnet50" ...]

Timings are means over `--repeats` steps after one warm-up. Compare the ratios of one run: absolute times depend on
the machine and its load.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

BATCH_SIZE = 8
TEXT_LENGTH = 80
NUM_OBJECTS = 3
IMAGE_SIZE = 224
NUM_LABELS = 9
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
# The image backbones, as `HVPNetConfig` settings.
BACKBONES = {"resnet50": {"vision_backbone": "resnet50"}}
# The measured (encoder, backbone) configurations; the first is the reference of the ratios.
CONFIGURATIONS = [
    ("bert-base", "resnet50"),
    ("roberta-base", "resnet50"),
    ("xlm-roberta-large", "resnet50"),
]


def configuration_name(encoder: str, backbone: str) -> str:
    return f"{encoder} + {backbone}"


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_worker(encoder: str, backbone: str, repeats: int) -> dict:
    """Mean train-step seconds, peak RSS and parameter count of one configuration, in this process."""
    from transformers import Trainer, TrainingArguments

    from hvpnet_hf import HVPNetConfig, HVPNetForTokenClassification

    torch.manual_seed(0)
    config = HVPNetConfig(
        text_config=ENCODERS[encoder],
        num_object_images=NUM_OBJECTS,
        num_labels=NUM_LABELS,
        vision_chunk_size=8,
        **BACKBONES[backbone],
    )
    model = HVPNetForTokenClassification(config).train()
    with tempfile.TemporaryDirectory() as folder:
        optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(
            TrainingArguments(output_dir=folder, use_cpu=True, report_to="none")
        )
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = optimizer_cls(trainable, **optimizer_kwargs)

    generator = torch.Generator().manual_seed(0)
    vocabulary = config.text_config.vocab_size
    timings = []
    for index in range(repeats + 1):
        batch = {
            "input_ids": torch.randint(5, vocabulary, (BATCH_SIZE, TEXT_LENGTH), generator=generator),
            "attention_mask": torch.ones(BATCH_SIZE, TEXT_LENGTH, dtype=torch.long),
            "labels": torch.randint(0, NUM_LABELS, (BATCH_SIZE, TEXT_LENGTH), generator=generator),
            "pixel_values": torch.randn(BATCH_SIZE, 1 + NUM_OBJECTS, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator),
            "image_mask": torch.ones(BATCH_SIZE, 1 + NUM_OBJECTS, dtype=torch.bool),
        }
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if index:  # the first step is a warm-up
            timings.append(time.perf_counter() - start)
    return {
        "seconds": statistics.mean(timings),
        "peak_rss_gib": peak_rss_gib(),
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
        "trainable": sum(parameter.numel() for parameter in trainable),
    }


def run_in_subprocess(arguments: list[str]) -> dict:
    command = [sys.executable, __file__, *arguments]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(arguments)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    names = {configuration_name(*pair): pair for pair in CONFIGURATIONS}
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per configuration (after one warm-up)")
    parser.add_argument("--configurations", nargs="*", default=list(names), choices=list(names))
    parser.add_argument("--worker", nargs=2, metavar=("ENCODER", "BACKBONE"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(run_worker(*args.worker, args.repeats)))
        return

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, repeats={args.repeats}: train step at batch "
        f"{BATCH_SIZE} x {TEXT_LENGTH} tokens, {1 + NUM_OBJECTS} images of {IMAGE_SIZE} px, random weights"
    )
    rows = {
        name: run_in_subprocess(["--repeats", str(args.repeats), "--worker", *names[name]])
        for name in args.configurations
    }
    reference = rows[args.configurations[0]]
    print(f"\n{'configuration':36s} {'params':>8s} {'trained':>8s} {'train s':>8s} {'ratio':>6s} {'GiB':>6s}")
    for name, row in rows.items():
        print(
            f"{name:36s} {row['parameters'] / 1e6:7.0f}M {row['trainable'] / 1e6:7.0f}M {row['seconds']:8.2f} "
            f"{row['seconds'] / reference['seconds']:5.2f}x {row['peak_rss_gib']:6.2f}"
        )
    print(f"(ratio: step time over '{args.configurations[0]}'; GiB: peak RSS of the process, optimizer included)")


if __name__ == "__main__":
    main()
