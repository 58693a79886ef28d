"""
Cross-task transfer as in the paper's Table 3: trains the target task from scratch and, beside it, starting from a
model trained on the other task (an MNER model for MRE, or the reverse): the text encoder and the visual prefix
(backbone, stage projections, gates, key/value projections) come from the source model, the task head is new. The
target config must build the source's architecture (same text encoder size, backbone and prefix settings). Writes
`cross_task.md` and `cross_task.json`: the scores from scratch and transferred (mean over the seeds) and which
parameters were loaded, which are new and which source parameters were left unused. Finished runs are not run again.

    python examples/paper/cross_task.py examples/configs/mnre.yaml --task re --source outputs/t17 \\
        --output_dir outputs/t17-to-mnre
    python examples/paper/cross_task.py examples/configs/twitter2017.yaml --task ner --source outputs/mnre
"""

import json
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from hvpnet_hf.analysis.data import load_model
from hvpnet_hf.analysis.reporting import format_score, write_report
from hvpnet_hf.pipelines import PIPELINE_FOR_TASK, task_of
from hvpnet_hf.processing_hvpnet import HVPNetProcessor
from hvpnet_hf.vision_backbone import default_out_indices

from runs import check_script_arguments, run_script, seed_count, summarize, training_parser

# Settings the source and target models must share for the source weights to mean the same thing.
SHARED_SETTINGS = (
    "vision_backbone",
    "prefix_mode",
    "prefix_grid",
    "use_visual_prefix",
    "use_global_image",
    "num_object_images",
)
TEXT_SETTINGS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
TRANSFER_FILE = "transfer.json"


def backbone_levels(config: PretrainedConfig) -> list[int]:
    """The backbone levels the config's prefix reads: `vision_out_indices`, or the backbone's defaults."""
    if config.vision_out_indices is not None:
        return list(config.vision_out_indices)
    return default_out_indices(config.vision_backbone, config.vision_model_args)


def check_same_architecture(source: PretrainedConfig, target: PretrainedConfig) -> None:
    differences = [
        f"{name}: {getattr(source, name)!r} vs {getattr(target, name)!r}"
        for name in SHARED_SETTINGS
        if getattr(source, name) != getattr(target, name)
    ]
    # None stands for the backbone's default levels: a config that names them builds the same backbone.
    source_levels, target_levels = backbone_levels(source), backbone_levels(target)
    if source_levels != target_levels:
        differences.append(f"backbone levels: {source_levels} vs {target_levels}")
    differences += [
        f"text_config.{name}: {getattr(source.text_config, name)} vs {getattr(target.text_config, name)}"
        for name in TEXT_SETTINGS
        if getattr(source.text_config, name) != getattr(target.text_config, name)
    ]
    if differences:
        raise ValueError(
            "the target config builds another architecture than the source model (source vs target): "
            + "; ".join(differences)
        )


@torch.no_grad()
def transfer_weights(source: PreTrainedModel, target: PreTrainedModel) -> dict[str, list[str]]:
    """
    Copies the source's encoder weights (text encoder and visual prefix) into the target's. Embedding rows of tokens
    the source lacks (the relation markers) keep their new initialization. Returns the parameter names of the target
    that were `loaded`, `partly_loaded` (embeddings) or `new`, and the source names left `unused`.
    """
    source_prefix, target_prefix = source.base_model_prefix, target.base_model_prefix
    source_state = source.base_model.state_dict()
    report: dict[str, list[str]] = {"loaded": [], "partly_loaded": [], "new": [], "unused": []}
    target_base_names = set()
    for name, tensor in target.base_model.state_dict().items():
        target_base_names.add(name)
        weight = source_state.get(name)
        full_name = f"{target_prefix}.{name}"
        if weight is None:
            report["new"].append(full_name)
        elif weight.shape == tensor.shape:
            tensor.copy_(weight)
            report["loaded"].append(full_name)
        elif weight.shape[1:] == tensor.shape[1:] and weight.shape[0] < tensor.shape[0]:
            tensor[: len(weight)].copy_(weight)  # a vocabulary grown by new tokens
            report["partly_loaded"].append(f"{full_name} (first {len(weight)} of {len(tensor)} rows)")
        else:
            raise ValueError(f"{full_name}: source shape {tuple(weight.shape)}, target {tuple(tensor.shape)}")
    base_names = {f"{target_prefix}.{name}" for name in target_base_names}
    report["new"] += [name for name in target.state_dict() if name not in base_names]
    report["unused"] = [f"{source_prefix}.{name}" for name in source_state if name not in target_base_names]
    report["unused"] += [name for name in source.state_dict() if not name.startswith(f"{source_prefix}.")]
    return report


def build_transferred_start(source_dir: str, scratch_dir: Path, init_dir: Path, task: str, seed: int) -> dict:
    """
    Saves into `init_dir` the target model to train: the configuration and processor of the from-scratch run
    (target labels and tokenizer), a freshly initialized head (seeded) and the source's encoder weights.
    """
    if (init_dir / TRANSFER_FILE).is_file():
        return json.loads((init_dir / TRANSFER_FILE).read_text(encoding="utf-8"))
    _, _, source = load_model(source_dir)
    config = AutoConfig.from_pretrained(scratch_dir)
    check_same_architecture(source.config, config)
    torch.manual_seed(seed)
    target = PIPELINE_FOR_TASK[task].auto_model_class.from_config(config)
    report = {"source": source_dir, **transfer_weights(source, target)}
    target.save_pretrained(init_dir)
    HVPNetProcessor.from_pretrained(scratch_dir).save_pretrained(init_dir)
    (init_dir / TRANSFER_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def module_counts(names: list[str]) -> str:
    """`module.submodule` prefixes of parameter names with how many names each holds."""
    counts: dict[str, int] = {}
    for name in names:
        group = ".".join(name.split(".")[:2])
        counts[group] = counts.get(group, 0) + 1
    return ", ".join(f"{group}.* ({count})" for group, count in counts.items()) or "none"


def main(argv: list[str] | None = None) -> dict:
    parser = training_parser(__doc__, "outputs/cross_task")
    parser.add_argument("--source", required=True, help="folder of a model trained on the other task")
    args, script_flags = parser.parse_known_args(argv)
    check_script_arguments(args.task, [args.config, *script_flags])
    task_of(args.source)  # an error naming the folder unless it holds an HVPNeT model
    output_dir = Path(args.output_dir)
    scratch, transferred, transfers = {}, {}, {}
    for seed in args.seeds:
        seed_flags = [*script_flags, "--seed", str(seed)]
        scratch_dir = output_dir / "from_scratch" / f"seed-{seed}"
        scratch[seed] = run_script(args.task, scratch_dir, [args.config, *seed_flags])
        init_dir = output_dir / "transferred_start" / f"seed-{seed}"
        transfers[seed] = build_transferred_start(args.source, scratch_dir, init_dir, args.task, seed)
        transferred[seed] = run_script(
            args.task,
            output_dir / "transferred" / f"seed-{seed}",
            [args.config, *seed_flags, "--model_name_or_path", str(init_dir)],
        )
    summaries = {"from scratch": summarize(scratch), f"from {args.source}": summarize(transferred)}
    transfer = transfers[args.seeds[0]]
    lines = [
        f"| split | from scratch F1 ({seed_count(len(args.seeds))}) | from {args.source} F1 | change |",
        "|---|---|---|---|",
    ]
    for split in ("validation", "test"):
        before, after = (summary[split]["f1"] for summary in summaries.values())
        change = 100 * (after["mean"] - before["mean"])
        lines.append(f"| {split} | {format_score(**before)} | {format_score(**after)} | {change:+.2f} |")
    lines += [
        "",
        f"Loaded from the source: {module_counts(transfer['loaded'])}",
        f"Loaded in part: {', '.join(transfer['partly_loaded']) or 'none'}",
        f"New (initialized fresh): {', '.join(transfer['new']) or 'none'}",
        f"Source parameters left unused: {', '.join(transfer['unused']) or 'none'}",
    ]
    report = {
        "config": args.config,
        "flags": script_flags,
        "source": args.source,
        "runs": {"from_scratch": scratch, "transferred": transferred},
        "summary": summaries,
        "transfer": transfer,
    }
    write_report(output_dir, "cross_task", "\n".join(lines), report)
    return report


if __name__ == "__main__":
    main()
