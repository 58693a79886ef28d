"""Time a frozen backbone's pass with and without each speed-up of `speed_up_frozen_backbone`, in one run, and print
the ratios.

The pass is `visual_features` of `--images` images at 224 px (by default the paper's batch: 8 examples, the global
image and 3 crops each) in the model's calls of `vision_chunk_size` images, without autograd, as training and
inference run it:

- float32: as built; BatchNorms folded into the convolutions only; convolution weights `channels_last` only; both
  (`speed_up_frozen_backbone(model)`);
- under CPU autocast to bfloat16 (training with `--bf16`): as built; both speed-ups with the weights in float32; both
  with the weights held in bfloat16 (`speed_up_frozen_backbone(model, dtype=torch.bfloat16)`, what `HVPNetTrainer`
  does).

Every configuration is its own model with the same random weights; they take turns in `--rounds` rounds, so that a
change of load moves all of them. Ratios are the time as built over the time with the speed-ups (above 1: faster),
the median over the rounds and the lowest and highest within one round.

    python benchmarks/bench_frozen_backbone.py [--backbone resnet50 --images 32 --rounds 3 --repeats 2]
"""

import argparse
import statistics
import time

import torch

from hvpnet_hf import HVPNetConfig, HVPNetModel, speed_up_frozen_backbone
from hvpnet_hf.frozen_backbone import fold_batch_norms

TEXT = {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536}
IMAGE_SIZE = 224


def fold_only(model: HVPNetModel) -> None:
    fold_batch_norms(model.visual_encoder.backbone)


def channels_last_only(model: HVPNetModel) -> None:
    model.visual_encoder.backbone.to(memory_format=torch.channels_last)


def held_in_bfloat16(model: HVPNetModel) -> None:
    speed_up_frozen_backbone(model, dtype=torch.bfloat16)


# name: (how the model is changed, autocast dtype, the configuration it is compared with)
CONFIGURATIONS = {
    "float32, as built": (None, None, None),
    "float32, folded": (fold_only, None, "float32, as built"),
    "float32, channels_last": (channels_last_only, None, "float32, as built"),
    "float32, both": (speed_up_frozen_backbone, None, "float32, as built"),
    "bf16 autocast, as built": (None, torch.bfloat16, None),
    "bf16 autocast, both": (speed_up_frozen_backbone, torch.bfloat16, "bf16 autocast, as built"),
    "bf16 autocast, both, held in bf16": (held_in_bfloat16, torch.bfloat16, "bf16 autocast, as built"),
}


def mean_seconds(model: HVPNetModel, images: torch.Tensor, autocast_dtype: torch.dtype | None, repeats: int) -> float:
    """Mean seconds of `repeats` backbone passes, after one pass to warm up."""
    with torch.no_grad(), torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=bool(autocast_dtype)):
        model.visual_encoder.visual_features(images)
        start = time.perf_counter()
        for _ in range(repeats):
            model.visual_encoder.visual_features(images)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--images", type=int, default=8 * 4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    models = {}
    for name, (change, _, _) in CONFIGURATIONS.items():
        torch.manual_seed(0)
        models[name] = HVPNetModel(HVPNetConfig(text_config=TEXT, vision_backbone=args.backbone)).eval()
        if change is not None:
            change(models[name])
    images = torch.randn(args.images, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    chunk = models["float32, as built"].config.vision_chunk_size
    print(
        f"backbone={args.backbone}, {args.images} images at {IMAGE_SIZE} px in calls of {chunk}, "
        f"torch threads={torch.get_num_threads()}, {args.rounds} rounds of {args.repeats} passes",
        flush=True,
    )
    seconds = {name: [] for name in CONFIGURATIONS}
    for round_number in range(args.rounds):
        for name, (_, autocast_dtype, _) in CONFIGURATIONS.items():
            seconds[name].append(mean_seconds(models[name], images, autocast_dtype, args.repeats))
            print(f"round {round_number + 1}: {name:36s} {seconds[name][-1]:6.3f} s", flush=True)
    for name, (_, _, baseline) in CONFIGURATIONS.items():
        line = f"{name:36s} {statistics.median(seconds[name]):6.3f} s"
        if baseline is not None:
            ratios = [before / after for before, after in zip(seconds[baseline], seconds[name], strict=True)]
            line += f"   {statistics.median(ratios):.2f}x faster (rounds: {min(ratios):.2f}-{max(ratios):.2f}x)"
        print(line)


if __name__ == "__main__":
    main()
