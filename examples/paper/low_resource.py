"""
The low-resource experiment of the paper's Figure 3: the image-aware model and the same model with every image
masked (text only), trained on 5%, 10%, 20% and 50% of the training set and scored on the full validation and test
splits. A seed draws nested subsets (the 5% subset is part of the 10% one, and so on; `sample_subset`). Writes
`low_resource.md`, `low_resource.json` and `low_resource.png` (test F1 against the fraction). Finished runs are not
run again.

    python examples/paper/low_resource.py examples/configs/twitter2015.yaml --output_dir outputs/t15-low
"""

from pathlib import Path

from hvpnet_hf.analysis.plotting import pyplot
from hvpnet_hf.analysis.reporting import format_score, write_report

from runs import check_script_arguments, run_seeds, summarize, training_parser

# folder: (label, flags of the training script)
MODELS = {"image_aware": ("image-aware", []), "text_only": ("text-only (images masked)", ["--mask_images", "true"])}
PAPER_RATIOS = (0.05, 0.1, 0.2, 0.5)


def plot(curves: dict[str, dict[float, dict]], split: str, path: Path) -> None:
    """F1 (mean, with the standard deviation as error bars) of each model against the training fraction."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(5, 3.5))
    for model, points in curves.items():
        ratios = sorted(points)
        means = [100 * points[ratio][split]["f1"]["mean"] for ratio in ratios]
        errors = [100 * (points[ratio][split]["f1"]["std"] or 0.0) for ratio in ratios]
        axes.errorbar([100 * ratio for ratio in ratios], means, yerr=errors, marker="o", capsize=3, label=model)
    axes.set_xlabel("training examples used (%)")
    axes.set_ylabel(f"{split} F1 (%)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=150)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    parser = training_parser(__doc__, "outputs/low_resource")
    parser.add_argument("--ratios", type=float, nargs="+", default=list(PAPER_RATIOS))
    args, script_flags = parser.parse_known_args(argv)
    output_dir = Path(args.output_dir)
    ratios = sorted(args.ratios)
    for _, model_flags in MODELS.values():
        for ratio in ratios:
            check_script_arguments(args.task, [args.config, *script_flags, *model_flags, "--sample_ratio", str(ratio)])
    curves: dict[str, dict[float, dict]] = {}
    report = {"config": args.config, "flags": script_flags, "models": {}}
    for folder_name, (model, model_flags) in MODELS.items():
        curves[model] = {}
        report["models"][model] = {"flags": model_flags, "ratios": {}}
        for ratio in ratios:
            folder = output_dir / folder_name / f"ratio-{ratio:g}"
            arguments = [args.config, *script_flags, *model_flags, "--sample_ratio", str(ratio)]
            runs = run_seeds(args.task, arguments, args.seeds, folder)
            curves[model][ratio] = summarize(runs)
            train_sizes = sorted({results["train_samples"] for results in runs.values()})
            report["models"][model]["ratios"][ratio] = {
                "train_samples": train_sizes,
                "runs": runs,
                "summary": curves[model][ratio],
            }

    columns = [(model, split) for model in curves for split in ("validation", "test")]
    lines = [
        "| training fraction | " + " | ".join(f"{model} {split} F1" for model, split in columns) + " |",
        "|---" * (1 + len(columns)) + "|",
    ]
    for ratio in ratios:
        cells = [format_score(**curves[model][ratio][split]["f1"]) for model, split in columns]
        lines.append(f"| {100 * ratio:g}% | " + " | ".join(cells) + " |")
    plot(curves, "test", output_dir / "low_resource.png")
    write_report(output_dir, "low_resource", "\n".join(lines), report)
    return report


if __name__ == "__main__":
    main()
