"""Time and measure a training step and an inference batch of the authors' HVPNeT code and of hvpnet_hf side by side,
at the paper's settings, in one run.

Settings (paper appendix B): bert-base and resnet50, both random, 1 global image + 3 crops at 224 px, batch 8, text
padded to 80 tokens, NER. The authors' code (a checkout of zjunlp/HVPNeT, run by the Python of its own environment,
see `original_worker.py`) trains and evaluates as its `NERTrainer` does. hvpnet_hf runs in four ways:

- fp32 live: float32, the backbone run on the pixels in calls of `--chunk-size` images (`vision_chunk_size`, the
  model's default of 4 unless given; the original runs it in calls of 8, one per image slot);
- bf16 live: training under CPU autocast to bfloat16 with the frozen backbone held in bfloat16 (what
  `HVPNetTrainer` does with `--bf16`); inference with the model built in bfloat16 (CRF in float32, what
  `from_pretrained(..., dtype=torch.bfloat16)` gives);
- fp32 cached / bf16 cached: the same, reading cached backbone features instead of pixels (`--feature_cache`).

Our training processes start as the example training scripts do, with `hvpnet_hf.training.keep_freed_memory` (glibc
keeps freed memory); the original's run with the C allocator's defaults. Setting `MALLOC_MMAP_MAX_`,
`MALLOC_MMAP_THRESHOLD_` or `MALLOC_TRIM_THRESHOLD_` in this command's environment runs every process, theirs too,
with those settings instead.

Every measurement runs in a fresh process, so its peak memory (maximum RSS: imports, model, optimizer state,
activations) is its own, and the configurations are interleaved over `--rounds` rounds, so that a change of load
moves all of them; the tables give the median over the rounds of each process's mean step time, and the lowest and
highest speed-up within one round. Ratios are the original's time over ours (above 1: we are faster) and our peak
over the original's (below 1: we use less).
`--profile` adds where the time of one hvpnet_hf training step and inference batch goes, fp32 and bf16: backbone,
the rest of the forward, backward, optimizer, and the costliest operators; and the original's costliest operators.

    python benchmarks/bench_original.py --original HVPNeT --original-python HVPNeT/venv/bin/python \\
        [--rounds 3] [--repeats 3] [--chunk-size 4] [--profile]

The authors' environment needs torch and torchvision (the releases this package is tested with),
transformers==4.11.3, pytorch-crf, seqeval, scikit-learn and tqdm; `docs/benchmarks.md` says how to set it up.
"""

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import torch
from bench_utils import (
    BATCH_SIZE,
    IMAGE_SIZE,
    NUM_OBJECTS,
    TEXT_LENGTH,
    mean_seconds,
    peak_rss_gib,
    profiled_step,
    rss_gib,
    run_in_subprocess,
)

from hvpnet_hf import HVPNetConfig

NUM_LABELS = 9  # the BIO tags over PER, LOC, ORG, MISC
CONFIGURATIONS = {
    "fp32 live": {"dtype": None, "cached": False},
    "bf16 live": {"dtype": torch.bfloat16, "cached": False},
    "fp32 cached": {"dtype": None, "cached": True},
    "bf16 cached": {"dtype": torch.bfloat16, "cached": True},
}
MODES = ("train", "inference")


def build_model(settings: dict, mode: str, chunk_size: int):
    """The paper's NER model with random weights, its backbone run in calls of `chunk_size` images: float32, or
    built in bfloat16 for bf16 inference; its frozen backbone sped up as `HVPNetTrainer` and the pipelines run it
    (held in bfloat16 for bf16 training)."""
    from hvpnet_hf import HVPNetForTokenClassification, speed_up_frozen_backbone

    config = HVPNetConfig(vision_backbone="resnet50", num_labels=NUM_LABELS, vision_chunk_size=chunk_size)
    if settings["dtype"] is None or mode == "train":
        model = HVPNetForTokenClassification(config)
        speed_up_frozen_backbone(model, dtype=settings["dtype"])
        return model
    # Built in bfloat16 directly (as `from_pretrained(..., dtype=...)` loads it), never as a float32 copy first.
    model = HVPNetForTokenClassification._from_config(config, dtype=settings["dtype"])
    model.crf.float()  # `_keep_in_fp32_modules_strict`, which `from_pretrained` applies
    speed_up_frozen_backbone(model)
    return model


def make_batch(generator: torch.Generator, settings: dict, feature_shape: tuple) -> dict:
    """Random inputs: 8 sentences of 80 tokens, every token a word, 1 + 3 images (pixels or cached features)."""
    attention_mask = torch.ones(BATCH_SIZE, TEXT_LENGTH, dtype=torch.long)
    batch = {
        "input_ids": torch.randint(1000, 20000, (BATCH_SIZE, TEXT_LENGTH), generator=generator),
        "attention_mask": attention_mask,
        "word_start_mask": attention_mask.bool(),
        "labels": torch.randint(0, NUM_LABELS, (BATCH_SIZE, TEXT_LENGTH), generator=generator),
    }
    slots = (BATCH_SIZE, 1 + NUM_OBJECTS)
    if settings["cached"]:
        batch["image_features"] = torch.rand(*slots, *feature_shape, generator=generator)
        batch["image_features_mask"] = torch.ones(slots, dtype=torch.bool)
    else:
        batch["pixel_values"] = torch.randn(*slots, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
        batch["image_mask"] = torch.ones(slots, dtype=torch.bool)
    return batch


def make_step(model, settings: dict, mode: str):
    """The training step `Trainer` runs, or an inference batch (eval mode, no autograd, CRF decoding)."""
    from bench_utils import train_step

    if mode == "train":
        return train_step(model, autocast_dtype=settings["dtype"])
    model.eval()

    def infer(batch: dict) -> None:
        with torch.no_grad():
            logits = model(**{key: value for key, value in batch.items() if key != "labels"}).logits
            model.decode(logits, batch["word_start_mask"])

    return infer


def prepared(name: str, mode: str, chunk_size: int) -> tuple:
    """The model, its step, a batch maker of configuration `name` in `mode`, and the RSS after the imports and
    with the model and optimizer built (hvpnet_hf is imported with this module, as every user imports it)."""
    if mode == "train":
        import transformers.trainer  # noqa: F401  (a training process imports it)

        from hvpnet_hf.training import keep_freed_memory

        keep_freed_memory()  # as the example training scripts start
    imports_gib = rss_gib()
    torch.manual_seed(0)
    settings = CONFIGURATIONS[name]
    model = build_model(settings, mode, chunk_size)
    encoder = model.hvpnet.visual_encoder  # the (g*g, C) features the cache would serve, without running it
    feature_shape = (model.config.prefix_grid**2, sum(encoder.stage_channels))
    generator = torch.Generator().manual_seed(0)
    step = make_step(model, settings, mode)
    memory = {"imports_gib": imports_gib, "model_gib": rss_gib()}
    return model, step, lambda: make_batch(generator, settings, feature_shape), memory


def run_worker(name: str, mode: str, repeats: int, chunk_size: int) -> dict:
    """One configuration's mean step time, memory and parameter counts, and the pages a step faults in once the
    first one has allocated everything (fresh memory from the system: what an allocator that hands freed memory
    back costs in time)."""
    model, step, batch, memory = prepared(name, mode, chunk_size)
    step(batch())  # the optimizer state and the first allocations, left out of the fault count
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    seconds = mean_seconds(step, [batch] * (repeats + 1))
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    optimized = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    return {
        "seconds": seconds,
        "peak_rss_gib": peak_rss_gib(),
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
        "optimized_parameters": optimized if mode == "train" else 0,
        "page_faults_per_step": faults / (repeats + 1),
        **memory,
    }


def run_profile(name: str, mode: str, chunk_size: int) -> dict:
    """Seconds of one step after a warm-up: in the backbone, in the rest of the forward, and after the forward
    (backward and optimizer); and the ten costliest operators (self time)."""
    model, step, batch, _ = prepared(name, mode, chunk_size)
    step(batch())
    seconds = {"backbone": 0.0, "forward": 0.0}
    starts = []

    def timer(module: torch.nn.Module, phase: str) -> None:
        module.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter()))
        module.register_forward_hook(
            lambda *_: seconds.__setitem__(phase, seconds[phase] + time.perf_counter() - starts.pop())
        )

    timer(model, "forward")
    timer(model.hvpnet.visual_encoder.backbone, "backbone")
    total, operators = profiled_step(step, batch())
    phases = {
        "backbone": seconds["backbone"],
        "rest of forward": seconds["forward"] - seconds["backbone"],
        "backward and optimizer": total - seconds["forward"],
        "total": total,
    }
    return {"phases": phases, "operators": operators}


def original_arguments(args: argparse.Namespace, mode: str) -> list[str]:
    return ["--checkout", args.original, "--mode", mode, "--repeats", str(args.repeats)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--original", help="a checkout of zjunlp/HVPNeT")
    parser.add_argument("--original-python", help="the Python of the authors' code's environment")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every measurement")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per process (after one warm-up)")
    parser.add_argument("--configurations", nargs="*", default=list(CONFIGURATIONS), choices=list(CONFIGURATIONS))
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=HVPNetConfig().vision_chunk_size,
        help="images per backbone call (`vision_chunk_size`) in our live modes; default: the model's default",
    )
    parser.add_argument("--profile", action="store_true", help="also show where one hvpnet_hf step's time goes")
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "NAME"), help=argparse.SUPPRESS)
    parser.add_argument("--profile-worker", nargs=2, metavar=("MODE", "NAME"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(args.worker[1], args.worker[0], args.repeats, args.chunk_size)))
        return
    if args.profile_worker:
        print(json.dumps(run_profile(args.profile_worker[1], args.profile_worker[0], args.chunk_size)))
        return

    if not (args.original and args.original_python):
        parser.error("--original and --original-python are required")
    worker = str(Path(__file__).with_name("original_worker.py"))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds x {args.repeats} steps, "
        f"backbone calls of {args.chunk_size}"
    )
    chunk = ["--chunk-size", str(args.chunk_size)]
    results: dict[tuple[str, str], list[dict]] = {}
    for round_index in range(args.rounds):
        for mode in MODES:
            for name in ["original", *args.configurations]:
                if name == "original":
                    row = run_in_subprocess(worker, original_arguments(args, mode), python=args.original_python)
                else:
                    row = run_in_subprocess(__file__, ["--repeats", str(args.repeats), *chunk, "--worker", mode, name])
                results.setdefault((name, mode), []).append(row)
                print(
                    f"  round {round_index + 1} {mode:9s} {name:12s} {row['seconds']:6.2f} s {row['peak_rss_gib']:5.2f} GiB",
                    flush=True,
                )

    def median(name: str, mode: str, key: str) -> float:
        return statistics.median(row[key] for row in results[(name, mode)])

    def round_speed_ups(name: str, mode: str) -> list[float]:
        """The original's time over ours within each round: what a change of the machine's load moves least."""
        pairs = zip(results[("original", mode)], results[(name, mode)], strict=True)
        return [original["seconds"] / ours["seconds"] for original, ours in pairs]

    for mode in MODES:
        print(f"\n{mode} (median of {args.rounds} rounds; speed-up per round: lowest-highest)")
        print(
            f"{'':14s} {'s':>7s} {'speed-up':>9s} {'per round':>12s} {'peak GiB':>9s} {'vs orig':>8s} "
            f"{'params':>8s} {'optimized':>9s}"
        )
        for name in ["original", *args.configurations]:
            seconds, peak = median(name, mode, "seconds"), median(name, mode, "peak_rss_gib")
            speed_up = median("original", mode, "seconds") / seconds
            per_round = round_speed_ups(name, mode)
            spread = f"{min(per_round):.2f}-{max(per_round):.2f}x"
            memory = peak / median("original", mode, "peak_rss_gib")
            parameters = results[(name, mode)][0]["parameters"] / 1e6
            optimized = results[(name, mode)][0]["optimized_parameters"] / 1e6
            print(
                f"{name:14s} {seconds:7.2f} {speed_up:8.2f}x {spread:>12s} {peak:9.2f} {memory:7.2f}x "
                f"{parameters:7.1f}M {optimized:8.1f}M"
            )

    print("\nwhere the memory goes (GiB, median): after the imports, model (and optimizer) built, peak; the peak")
    print(
        "less the model is the step's own: gradients, optimizer moments, activations, freed memory the allocator kept"
    )
    for mode in MODES:
        for name in ["original", *args.configurations]:
            imports, model = median(name, mode, "imports_gib"), median(name, mode, "model_gib")
            peak = median(name, mode, "peak_rss_gib")
            print(
                f"  {mode:9s} {name:12s} imports {imports:5.2f}  model {model - imports:5.2f}  step {peak - model:5.2f}"
            )

    if args.profile:
        for name in ("original", "fp32 live", "bf16 live"):
            for mode in MODES:
                if name == "original":
                    arguments = [*original_arguments(args, mode), "--profile"]
                    profile = run_in_subprocess(worker, arguments, python=args.original_python)
                else:
                    profile = run_in_subprocess(__file__, [*chunk, "--profile-worker", mode, name])
                phases = ", ".join(f"{phase} {seconds:.2f} s" for phase, seconds in profile["phases"].items())
                print(f"\nprofile, {name}, {mode}: {phases}")
                for operator, seconds, count in profile["operators"]:
                    print(f"  {operator:40s} {seconds:6.3f} s  {count:5d} calls")


if __name__ == "__main__":
    main()
