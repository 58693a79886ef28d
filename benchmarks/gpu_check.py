"""
The GPU check: what only a CUDA device can show, run by `benchmarks/gpu_check.sh`.

Checks (each against float32 eager on the same device, with the tolerance written next to it): a forward under bf16
autocast, sdpa attention against eager attention, `torch.compile`, `torch.export`, and the feature path a
`VisualFeatureCache` feeds (pooled backbone features passed as `image_features` instead of pixels). Timings, at the
paper's settings (bert-base + resnet50, batch 8, 80 tokens, 1 + 3 images of 224 px) and at those of
`examples/configs/*_xlmr_large_clip.yaml` (xlm-roberta-large + CLIP ViT-B/16, batch 8, 128 tokens): a training
step in fp32, tf32 and bf16 autocast, inference throughput in bf16 autocast, and the peak GPU memory of each.
Weights are random, built from the known sizes: nothing is downloaded.

    python benchmarks/gpu_check.py             # on a CUDA device
    python benchmarks/gpu_check.py --dry_run   # tiny sizes, on CPU when there is no GPU: checks the script runs
"""

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_encoders import ENCODERS  # noqa: E402

from hvpnet_hf import HVPNetConfig, HVPNetForTokenClassification, speed_up_frozen_backbone  # noqa: E402

NUM_LABELS = 9  # the MNER BIO tags of four entity types
# name: (text_config, timm backbone, batch, tokens, image side)
SETTINGS = {
    "paper (bert-base + resnet50)": (ENCODERS["bert-base"], "resnet50", 8, 80, 224),
    "xlmr-large + clip-b16": (ENCODERS["xlm-roberta-large"], "vit_base_patch16_clip_224", 8, 128, 224),
}
TINY_TEXT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 37}
DRY_SETTINGS = {"tiny": ({"model_type": "bert", "vocab_size": 99, **TINY_TEXT}, "test_resnet", 2, 12, 32)}
NUM_OBJECTS = 3


def build_model(text_config: dict, backbone: str, device: torch.device, **config) -> HVPNetForTokenClassification:
    torch.manual_seed(0)
    model_config = HVPNetConfig(
        text_config=text_config,
        vision_backbone=backbone,
        num_object_images=NUM_OBJECTS,
        num_labels=NUM_LABELS,
        **config,
    )
    return HVPNetForTokenClassification(model_config).to(device)


def random_batch(vocabulary: int, batch: int, tokens: int, side: int, device: torch.device) -> dict:
    """Model inputs with labels: `tokens` random ids of the vocabulary, every image present."""
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "input_ids": torch.randint(5, vocabulary, (batch, tokens), generator=generator),
        "attention_mask": torch.ones(batch, tokens, dtype=torch.long),
        "labels": torch.randint(0, NUM_LABELS, (batch, tokens), generator=generator),
        "pixel_values": torch.randn(batch, 1 + NUM_OBJECTS, 3, side, side, generator=generator),
    }
    return {key: value.to(device) for key, value in inputs.items()}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run, device: torch.device, repeats: int) -> float:
    """Median seconds of `run()` over `repeats` calls after two warm-ups."""
    for _ in range(2):
        run()
    timings = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def measure(name: str, setting: tuple, device: torch.device, repeats: int) -> list[tuple]:
    """Rows (setting, what, ms, examples/s, peak GiB) of the training steps and of inference."""
    text_config, backbone, batch_size, tokens, side = setting
    rows = []
    for precision in ("fp32", "tf32", "bf16"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
        reset_peak(device)
        model = build_model(text_config, backbone, device)
        speed_up_frozen_backbone(model, dtype=torch.bfloat16 if precision == "bf16" else None)
        optimizer = torch.optim.AdamW([parameter for parameter in model.parameters() if parameter.requires_grad])
        batch = random_batch(text_config.get("vocab_size", 30522), batch_size, tokens, side, device)
        step = functools.partial(train_step, model, optimizer, batch, precision == "bf16")
        seconds = timed(step, device, repeats)
        rows.append((name, f"train step {precision}", seconds * 1e3, batch_size / seconds, peak_gib(device)))
        del model, optimizer, batch, step
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    reset_peak(device)
    model = build_model(text_config, backbone, device).eval()
    speed_up_frozen_backbone(model)
    inference_batch = 4 * batch_size  # the settings files' per_device_eval_batch_size
    batch = random_batch(text_config.get("vocab_size", 30522), inference_batch, tokens, side, device)
    batch.pop("labels")

    @torch.inference_mode()
    def predict() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            model(**batch)

    seconds = timed(predict, device, repeats)
    rows.append((name, "inference bf16", seconds * 1e3, inference_batch / seconds, peak_gib(device)))
    return rows


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict, bf16: bool) -> None:
    """Forward (under bf16 autocast when `bf16`), backward and an optimizer update, as `Trainer` runs a step."""
    model.train()
    with torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def check(name: str, got: torch.Tensor, expected: torch.Tensor, tolerance: float) -> tuple[str, bool, float]:
    """(name, passed, largest absolute difference) of emission scores against float32 eager."""
    difference = (got.float() - expected.float()).abs().max().item()
    return name, difference <= tolerance, difference


def run_checks(device: torch.device) -> list[tuple[str, bool, float]]:
    """The checks on a tiny model on `device`, each against float32 eager with sdpa (the default attention)."""
    text_config, backbone, batch_size, tokens, side = DRY_SETTINGS["tiny"]
    model = build_model(text_config, backbone, device).eval()
    batch = random_batch(text_config["vocab_size"], batch_size, tokens, side, device)
    batch.pop("labels")
    with torch.no_grad():
        expected = model(**batch).logits
        with torch.autocast(device.type, dtype=torch.bfloat16):
            bf16 = model(**batch).logits
        eager = build_model(text_config, backbone, device, attn_implementation="eager").eval()(**batch).logits
        compiled = torch.compile(model)(**batch).logits
        exported = torch.export.export(model, args=(), kwargs=batch).module()(**batch).logits
        encoder = model.hvpnet.visual_encoder
        pixels = batch["pixel_values"]
        features = encoder.visual_features(pixels.flatten(0, 1)).unflatten(0, pixels.shape[:2])
        text = {key: value for key, value in batch.items() if key != "pixel_values"}
        cached = model(**text, image_features=features).logits
    # bfloat16 keeps 8 bits of mantissa: emission scores of about 1 move by a few 1e-2 through 2 layers. The other
    # paths compute the same float32 math in another order (fused kernels, other reductions): 1e-4.
    return [
        check("bf16 autocast", bf16, expected, 5e-2),
        check("sdpa vs eager attention", eager, expected, 1e-4),
        check("torch.compile", compiled, expected, 1e-4),
        check("torch.export", exported, expected, 1e-4),
        check("feature-cache path", cached, expected, 1e-4),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry_run", action="store_true", help="tiny sizes, on CPU when there is no GPU")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps after two warm-ups")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --dry_run to check the script on CPU")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    print(f"device: {card}, torch {torch.__version__}")
    results = run_checks(device)
    for name, passed, difference in results:
        print(f"check {name}: {'pass' if passed else 'FAIL'} (largest difference {difference:.2e})")
    settings = DRY_SETTINGS if args.dry_run else SETTINGS
    rows = [row for name, setting in settings.items() for row in measure(name, setting, device, args.repeats)]
    print("\n| setting | measurement | ms | examples/s | peak GPU GiB |\n| --- | --- | --- | --- | --- |")
    for name, what, milliseconds, throughput, peak in rows:
        peak_text = "-" if peak is None else f"{peak:.2f}"
        print(f"| {name} | {what} | {milliseconds:.1f} | {throughput:.1f} | {peak_text} |")
    if not all(passed for _, passed, _ in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
