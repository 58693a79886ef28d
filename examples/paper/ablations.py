"""
The ablations of the paper's Table 1, each over the same seeds: HVPNeT (pyramid), HVPNeT-Flat, HVPNeT-1T3,
HVPNeT-OnlyObj (no global image), no visual prefix (BERT-CRF for NER, BERT for RE) and the same model with every
image masked. Writes `ablations.md` and `ablations.json` (one row per variant: mean ± std over the seeds). Finished
runs are not run again.

    python examples/paper/ablations.py examples/configs/twitter2017.yaml --output_dir outputs/t17-ablations
    python examples/paper/ablations.py examples/configs/mnre.yaml --task re --variants pyramid flat
"""

from pathlib import Path

from hvpnet_hf.analysis.reporting import write_report

from runs import check_script_arguments, run_seeds, seed_count, summarize, summary_table, training_parser

# name: (row label, flags of the training script), in the order of the paper's table.
VARIANTS = {
    "no_visual_prefix": ("no visual prefix (BERT-CRF / BERT)", ["--config_overrides", "use_visual_prefix=false"]),
    "images_masked": ("HVPNeT, images masked", ["--mask_images", "true"]),
    "flat": ("HVPNeT-Flat", ["--config_overrides", "prefix_mode=flat"]),
    "one_to_three": ("HVPNeT-1T3", ["--config_overrides", "prefix_mode=one_to_three"]),
    "only_obj": ("HVPNeT-OnlyObj", ["--config_overrides", "use_global_image=false"]),
    "pyramid": ("HVPNeT", ["--config_overrides", "prefix_mode=pyramid"]),
}


def main(argv: list[str] | None = None) -> dict:
    parser = training_parser(__doc__, "outputs/ablations")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args, script_flags = parser.parse_known_args(argv)
    output_dir = Path(args.output_dir)
    report = {"config": args.config, "flags": script_flags, "variants": {}}
    for name in args.variants:
        check_script_arguments(args.task, [args.config, *script_flags, *VARIANTS[name][1]])
    rows = {}
    for name in args.variants:
        label, variant_flags = VARIANTS[name]
        runs = run_seeds(args.task, [args.config, *script_flags, *variant_flags], args.seeds, output_dir / name)
        summary = summarize(runs)
        report["variants"][name] = {"label": label, "flags": variant_flags, "runs": runs, "summary": summary}
        rows[label] = summary
    write_report(output_dir, "ablations", summary_table(rows, f"variant ({seed_count(len(args.seeds))})"), report)
    return report


if __name__ == "__main__":
    main()
