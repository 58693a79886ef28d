"""
What the paper's training experiments share: they run the example training scripts (`examples/run_mner.py`,
`examples/run_mre.py`) over seeds and variants, skip the runs that already finished, and summarize their
`all_results.json` as mean and standard deviation per split.
"""

import argparse
import gc
import importlib.util
import json
import logging
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from hvpnet_hf.analysis.reporting import format_score
from hvpnet_hf.model_card import SPLIT_PREFIXES

logger = logging.getLogger(__name__)


def load_script(name: str) -> ModuleType:
    """The training script `examples/<name>.py` as a module (its `main` and `parse_arguments`), not run."""
    path = Path(__file__).resolve().parents[1] / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


SCRIPTS = {"ner": load_script("run_mner"), "re": load_script("run_mre")}
# The seeds whose mean the paper reports (appendix B).
PAPER_SEEDS = (1, 49, 1234, 2021, 4321)
# Metric prefixes of `all_results.json` and the splits they score.
SPLITS = {prefix: split for split, prefix in SPLIT_PREFIXES.items()}
METRICS = ("precision", "recall", "f1")
RESULTS_FILE = "all_results.json"

Summary = dict[str, dict[str, dict[str, float | None]]]


def read_results(output_dir: Path) -> dict[str, float] | None:
    """The run's scores, or None while it has not finished (validation and test F1 are written last)."""
    path = output_dir / RESULTS_FILE
    if not path.is_file():
        return None
    results = json.loads(path.read_text(encoding="utf-8"))
    return results if all(f"{prefix}_f1" in results for prefix in SPLITS) else None


def run_script(task: str, output_dir: Path, arguments: Sequence[str]) -> dict[str, float]:
    """
    Trains and evaluates with the task's example script (`arguments`: a config file, then flags) into
    `output_dir`, unless a finished run is already there. Returns its `all_results.json`.
    """
    results = read_results(output_dir)
    if results is not None:
        logger.info("%s: finished before, not run again", output_dir)
        return results
    script = SCRIPTS[task]
    arguments = joined_config_overrides(arguments)
    print(f"\n=== {Path(script.__file__).name} {' '.join(arguments)} --output_dir {output_dir} ===", flush=True)
    script.main([*arguments, "--output_dir", str(output_dir)])
    gc.collect()
    results = read_results(output_dir)
    if results is None:
        raise RuntimeError(f"{output_dir / RESULTS_FILE} lacks eval_f1 or test_f1: the runs must score both splits")
    return results


def check_script_arguments(task: str, arguments: Sequence[str]) -> None:
    """Reads `arguments` (a config file, then flags) as the task's script will, so that a setting it refuses stops
    the analysis before its first run rather than after some runs have finished."""
    SCRIPTS[task].parse_arguments([*joined_config_overrides(arguments), "--output_dir", "unused"])


def joined_config_overrides(arguments: Sequence[str]) -> list[str]:
    """
    `arguments` (a config file, then flags) with the file's `config_overrides` and every `--config_overrides` flag
    joined into one flag, in that order, so that a variant's settings add to the run's instead of replacing them
    (of one setting given twice, the later wins).
    """
    config, *flags = arguments
    with open(config, encoding="utf-8") as file:
        settings = yaml.safe_load(file) or {}
    overrides = [settings["config_overrides"]] if settings.get("config_overrides") else []
    others = []
    flag_values = iter(flags)
    for flag in flag_values:
        if flag == "--config_overrides":
            overrides.append(next(flag_values))
        else:
            others.append(flag)
    return [config, *others, *(["--config_overrides", ",".join(overrides)] if overrides else [])]


def run_seeds(
    task: str, arguments: Sequence[str], seeds: Sequence[int], output_dir: Path
) -> dict[int, dict[str, float]]:
    """One run per seed, in `output_dir/seed-<seed>`; the seed also draws `--sample_ratio` subsets."""
    return {seed: run_script(task, output_dir / f"seed-{seed}", [*arguments, "--seed", str(seed)]) for seed in seeds}


def summarize(runs: Mapping[Any, Mapping[str, float]]) -> Summary:
    """`{split: {metric: {"mean", "std"}}}` over the runs; `std` is the sample standard deviation (None for one run)."""
    summary: Summary = {}
    for prefix, split in SPLITS.items():
        summary[split] = {}
        for metric in METRICS:
            values = [results[f"{prefix}_{metric}"] for results in runs.values()]
            summary[split][metric] = {
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else None,
            }
    return summary


def seed_count(count: int) -> str:
    """`"1 seed"`, `"5 seeds"`: the seed count of a table heading."""
    return f"{count} seed" if count == 1 else f"{count} seeds"


def summary_table(rows: Mapping[str, Summary], first_column: str) -> str:
    """Markdown: one row per entry of `rows`, precision, recall and F1 of validation and test."""
    columns = [(split, metric) for split in SPLITS.values() for metric in METRICS]
    names = {"precision": "P", "recall": "R", "f1": "F1"}
    lines = [
        f"| {first_column} | " + " | ".join(f"{split} {names[metric]}" for split, metric in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for name, summary in rows.items():
        cells = [format_score(**summary[split][metric]) for split, metric in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def single_run_summary(results: Mapping[str, float]) -> Summary:
    """One run's scores in the shape of `summarize` (no standard deviation)."""
    return summarize({0: results})


def training_parser(description: str, default_output_dir: str) -> argparse.ArgumentParser:
    """
    The arguments every training analysis takes, after its `description` (its module docstring, printed as written);
    the flags it does not know go to the training script.
    """
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # so that a script flag such as --seed is never read as an abbreviation of --seeds
        epilog="Any other flag is passed on to the training script (e.g. --num_train_epochs 3).",
    )
    parser.add_argument("config", help="settings file of the training script (YAML or JSON)")
    parser.add_argument("--task", choices=sorted(SCRIPTS), default="ner", help="ner: run_mner.py, re: run_mre.py")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(PAPER_SEEDS))
    parser.add_argument("--output_dir", default=default_output_dir)
    return parser
