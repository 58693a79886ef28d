"""
Trains one config over several seeds (by default the paper's 1, 49, 1234, 2021 and 4321) and writes the mean and
standard deviation of precision, recall and F1 per split as `seeds.md` and `seeds.json`. Finished seeds are read
back, not run again, so an interrupted call continues where it stopped.

    python examples/paper/seeds.py examples/configs/twitter2015.yaml --output_dir outputs/t15-seeds
    python examples/paper/seeds.py examples/configs/mnre.yaml --task re --seeds 1 49
"""

from pathlib import Path

from hvpnet_hf.analysis.reporting import write_report

from runs import (
    check_script_arguments,
    run_seeds,
    seed_count,
    single_run_summary,
    summarize,
    summary_table,
    training_parser,
)


def main(argv: list[str] | None = None) -> dict:
    parser = training_parser(__doc__, "outputs/seeds")
    args, script_flags = parser.parse_known_args(argv)
    output_dir = Path(args.output_dir)
    check_script_arguments(args.task, [args.config, *script_flags])
    runs = run_seeds(args.task, [args.config, *script_flags], args.seeds, output_dir)
    summary = summarize(runs)
    rows = {f"seed {seed}": single_run_summary(results) for seed, results in runs.items()}
    rows[f"mean ± std ({seed_count(len(runs))})"] = summary
    report = {"config": args.config, "flags": script_flags, "runs": runs, "summary": summary}
    write_report(output_dir, "seeds", summary_table(rows, "run"), report)
    return report


if __name__ == "__main__":
    main()
