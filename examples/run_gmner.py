#!/usr/bin/env python
"""
Grounded multimodal NER (Twitter-GMNER, or the bundled sample set): reads the splits with every entity's gold boxes
and every image's candidate regions, and scores what any grounding model is compared with on the same candidates.

    python examples/run_gmner.py examples/configs/demo_gmner.yaml
    python examples/run_gmner.py examples/configs/twitter_gmner.yaml --num_candidates 18

A single `.json` / `.yaml` file gives the settings; command-line flags after it override them. For each scored split
the run prints and writes to `<output_dir>/all_results.json` the candidate recall (the share of groundable entities
with a candidate above IoU 0.5, which bounds EEG recall) and the GMNER / MNER / EEG scores (`gmner_f1`) of three
baselines on the gold spans and types: every entity's region is none (`none`), the largest candidate (`largest`), or
the detector's first candidate (`first`).
"""

import json
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import evaluate
import yaml
from transformers import HfArgumentParser

from hvpnet_hf.grounding_data import (
    DEFAULT_NUM_CANDIDATES,
    candidate_boxes_file,
    candidate_recall,
    load_gmner_dataset,
)
from hvpnet_hf.loading import SPLIT_ALIASES, find_release_layout
from hvpnet_hf.metrics import metric_path
from hvpnet_hf.output_files import check_output_dir
from hvpnet_hf.sample_data import sample_sources
from hvpnet_hf.script_utils import settings_as_flags

logger = logging.getLogger(__name__)

# How each baseline picks an entity's region among its image's candidates (the same region for every entity).
BASELINES = ("none", "largest", "first")
SCORES = ("gmner", "mner", "eeg")


@dataclass
class GmnerArguments:
    output_dir: str = field(default="outputs/gmner", metadata={"help": "Folder for all_results.json."})
    dataset: str = field(
        default="twitter_gmner",
        metadata={"help": "'sample' reads the bundled grounding set; any other name reads the flags below."},
    )
    data_dir: str | None = field(default=None, metadata={"help": "The release's txt/ folder (train, dev, test)."})
    xml_dir: str | None = field(default=None, metadata={"help": "The release's xml/ folder of box files."})
    image_dir: str | None = field(default=None, metadata={"help": "Folder of the Twitter-2015/2017 images."})
    object_dir: str | None = field(
        default=None,
        metadata={
            "help": "An hvpnet-extract-objects output folder: <split>/crops/, objects_<split>_dict.pth and "
            "objects_<split>_boxes.json."
        },
    )
    num_candidates: int = field(
        default=DEFAULT_NUM_CANDIDATES, metadata={"help": "The most candidate regions kept per image (the first)."}
    )
    splits: list[str] = field(default_factory=lambda: ["validation", "test"], metadata={"help": "The splits scored."})

    def __post_init__(self) -> None:
        if self.dataset != "sample":
            missing = [f"--{name}" for name in ("data_dir", "xml_dir", "object_dir") if getattr(self, name) is None]
            if missing:
                raise ValueError(f"dataset {self.dataset!r} needs {', '.join(missing)} (or use --dataset sample)")
        unknown = sorted(set(self.splits) - set(SPLIT_ALIASES))
        if unknown:
            raise ValueError(f"--splits: {unknown} are not splits; use any of {sorted(SPLIT_ALIASES)}")


def load_splits(args: GmnerArguments) -> datasets.DatasetDict:
    """The splits with their entities' gold boxes and their images' candidates (crops and boxes)."""
    if args.dataset == "sample":
        return load_gmner_dataset(**sample_sources("gmner"), num_candidates=args.num_candidates)
    layout = find_release_layout(args.image_dir, args.object_dir, args.object_dir)
    boxes = {split: candidate_boxes_file(args.object_dir, aliases[0]) for split, aliases in SPLIT_ALIASES.items()}
    return load_gmner_dataset(
        args.data_dir,
        xml_dir=args.xml_dir,
        **layout,
        candidate_boxes={split: path for split, path in boxes.items() if path.is_file()},
        num_candidates=args.num_candidates,
    )


def baseline_region(rule: str, candidate_boxes: Sequence[Sequence[float]]) -> list[float] | None:
    """The region the baseline `rule` gives every entity of an image with `candidate_boxes`: none, the largest
    candidate (the first of equal ones) or the first; none when the image has no candidate."""
    if rule not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {rule!r}")
    if rule == "none" or not candidate_boxes:
        return None
    if rule == "first":
        return list(candidate_boxes[0])
    return list(max(candidate_boxes, key=lambda box: (box[2] - box[0]) * (box[3] - box[1])))


def ground_with_baseline(
    entities: Sequence[Mapping], candidate_boxes: Sequence[Sequence[float]], rule: str
) -> list[dict]:
    """`entities` (`start`, `end`, `type`) each with the `box` of the baseline `rule`."""
    box = baseline_region(rule, candidate_boxes)
    return [
        {"start": entity["start"], "end": entity["end"], "type": entity["type"], "box": box} for entity in entities
    ]


def score_baselines(split: datasets.Dataset) -> dict[str, dict[str, float]]:
    """Per baseline, the `gmner_f1` scores of its regions on the split's gold spans and types."""
    metric = evaluate.load(metric_path("gmner_f1"))
    references = [
        [{key: entity[key] for key in ("start", "end", "type", "boxes")} for entity in entities]
        for entities in split["entities"]
    ]
    scores = {}
    for rule in BASELINES:
        predictions = [
            ground_with_baseline(entities, candidates, rule)
            for entities, candidates in zip(references, split["candidate_boxes"], strict=True)
        ]
        scores[rule] = metric.compute(predictions=predictions, references=references)
    return scores


def format_table(split: str, recall: float, scores: Mapping[str, Mapping[str, float]]) -> str:
    rows = [
        f"{split} (candidate recall {100 * recall:.2f}):",
        "| regions | GMNER F1 | MNER F1 | EEG F1 |",
        "|---|---|---|---|",
    ]
    for name, found in scores.items():
        rows.append(f"| {name} | " + " | ".join(f"{100 * found[f'{score}_f1']:.2f}" for score in SCORES) + " |")
    return "\n".join(rows)


def parse_arguments(argv: list[str]) -> GmnerArguments:
    """Flags, optionally after one JSON or YAML file whose settings they override."""
    parser = HfArgumentParser(GmnerArguments)
    if argv and argv[0].endswith((".json", ".yaml", ".yml")):
        with open(argv[0], encoding="utf-8") as file:
            argv = [*settings_as_flags(argv[0], yaml.safe_load(file) or {}, parser), *argv[1:]]
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    return args


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_arguments(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(format="%(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    output_dir = Path(args.output_dir)
    check_output_dir(output_dir, "--output_dir")
    splits = load_splits(args)
    results: dict[str, float] = {}
    for split in args.splits:
        if split not in splits:
            raise ValueError(f"the {split} split was not found in {args.data_dir or 'the sample set'}")
        recall = candidate_recall(splits[split])["recall"]
        scores = {f"baseline {rule}": found for rule, found in score_baselines(splits[split]).items()}
        print(format_table(split, recall, scores), flush=True)
        results[f"{split}_candidate_recall"] = recall
        for name, found in scores.items():
            rule = name.removeprefix("baseline ")
            results.update({f"{split}_{rule}_{score}_f1": found[f"{score}_f1"] for score in SCORES})
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "all_results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


if __name__ == "__main__":
    main()
