"""Time the visual prefix design choices against their alternatives, in one run, and print the ratios.

1. A frozen backbone run without autograd vs. a backbone that still receives gradients it never uses (what the
   original code does): one training step (forward + backward).
2. Absent images skipped before the backbone vs. zero images pushed through it, at a typical share of missing crops.
3. All images of a batch through the backbone in one call vs. one call per image.

    python benchmarks/bench_prefix.py [--backbone resnet50 --image-size 224 --batch-size 4 --repeats 3]
"""

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from hvpnet_hf import HVPNetConfig, HVPNetModel

TEXT = {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536}


def median_seconds(step: Callable[[], None], repeats: int) -> float:
    step()  # warm-up
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--text-length", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)

    config = HVPNetConfig(text_config=TEXT, vision_backbone=args.backbone)
    model = HVPNetModel(config).train()
    batch, size = args.batch_size, args.image_size
    inputs = {
        "input_ids": torch.randint(1000, 2000, (batch, args.text_length)),
        "pixel_values": torch.randn(batch, 4, 3, size, size),  # the global image and 3 crops
    }

    def training_step() -> None:
        model.zero_grad()
        model(**inputs).last_hidden_state.sum().backward()

    frozen = median_seconds(training_step, args.repeats)
    encoder = model.visual_encoder
    encoder.freeze_backbone = False  # the original code's behavior: gradients flow into an optimizer-less backbone
    encoder.backbone.requires_grad_(True)
    encoder.backbone.train()
    wasted = median_seconds(training_step, args.repeats)
    encoder.freeze_backbone = True
    encoder.backbone.requires_grad_(False)
    model.eval()

    # About half of the crop slots are empty in the published crop maps; mask one crop of three per example and
    # the third crop of every other example.
    images = inputs["pixel_values"]
    present = torch.ones(batch, 4, dtype=torch.bool)
    present[:, 3] = False
    present[::2, 2] = False
    with torch.no_grad():
        skipped = median_seconds(lambda: encoder(images, present), args.repeats)
        zero_images = images * present[..., None, None, None]
        pushed = median_seconds(lambda: encoder(zero_images, torch.ones_like(present)), args.repeats)
        flat = images.flatten(0, 1)
        one_call = median_seconds(lambda: encoder.backbone(flat), args.repeats)
        per_image = median_seconds(lambda: [encoder.backbone(image[None]) for image in flat], args.repeats)

    print(
        f"backbone={args.backbone} image_size={size} batch={batch} (+3 crops each), torch threads={torch.get_num_threads()}"
    )
    print(f"training step, frozen backbone without autograd : {frozen:.3f} s")
    print(f"training step, backbone with unused gradients   : {wasted:.3f} s  -> {wasted / frozen:.2f}x slower")
    print(f"prefix, absent images skipped                   : {skipped:.3f} s")
    print(f"prefix, zero images through the backbone        : {pushed:.3f} s  -> {pushed / skipped:.2f}x slower")
    print(f"backbone, one batched call                      : {one_call:.3f} s")
    print(
        f"backbone, one call per image                    : {per_image:.3f} s  -> {per_image / one_call:.2f}x slower"
    )


if __name__ == "__main__":
    main()
