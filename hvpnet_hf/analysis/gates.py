"""
The dynamic gates of the paper's Figure 4: for a trained model and one split, the mean gate weight of every text
layer on every backbone stage, over the present global images and, separately, over the present object crops
(absent images have no gate and are left out). Writes `gates.md`, `gates.json` and the heat map `gates.png`.

    python -m hvpnet_hf.analysis.gates --model outputs/demo/image_aware --output_dir outputs/gates
"""

import argparse
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig

from .data import add_data_arguments, batches, check_arguments, load_examples, load_model
from .plotting import pyplot
from .reporting import write_report


def slot_presence(batch: dict[str, torch.Tensor], config: PretrainedConfig, num_slots: int) -> torch.Tensor:
    """(B, n) True where the image of a prefix slot is present: the global image first (unless the model leaves it
    out), then the object crops, absent past the ones the batch holds."""
    present = batch["image_mask"].bool()  # (B, 1 + k), the global image in slot 0
    if not config.use_global_image:
        present = present[:, 1:]
    present = present[:, :num_slots]
    return torch.cat([present, present.new_zeros(len(present), num_slots - present.shape[1])], dim=1)


@torch.no_grad()
def mean_gates(model, processor, examples, batch_size: int) -> dict[str, dict]:
    """`{"global image" | "object crops": {"mean": (L, c) list, "images": count}}` over the present images."""
    config = model.config
    sums: dict[str, torch.Tensor] = {}
    counts = {"global image": 0, "object crops": 0}
    for batch, _ in batches(examples, processor, batch_size):
        batch.pop("labels")
        gate_weights = model(**batch, output_gate_weights=True).gate_weights  # (B, n, L, c)
        if gate_weights is None:
            raise ValueError(f"{config.name_or_path}: the model has no visual prefix, so no gates")
        present = slot_presence(batch, config, gate_weights.shape[1])
        is_global = torch.zeros(gate_weights.shape[1], dtype=torch.bool)
        is_global[0] = config.use_global_image
        for group, slots in (("global image", is_global), ("object crops", ~is_global)):
            chosen = present & slots  # (B, n)
            sums[group] = sums.get(group, 0) + gate_weights[chosen].sum(dim=0)
            counts[group] += int(chosen.sum())
    return {
        group: {"mean": (sums[group] / counts[group]).tolist() if counts[group] else None, "images": counts[group]}
        for group in counts
    }


def markdown(gates: dict[str, dict]) -> str:
    """One table per image group: a row per text layer, a column per backbone stage."""
    parts = []
    for group, entry in gates.items():
        if entry["mean"] is None:
            parts.append(f"**{group}**: no present image")
            continue
        num_stages = len(entry["mean"][0])
        lines = [
            f"**{group}** (mean over {entry['images']} images)",
            "",
            "| layer | " + " | ".join(f"stage {stage + 1}" for stage in range(num_stages)) + " |",
            "|---" * (num_stages + 1) + "|",
        ]
        lines += [
            f"| {layer + 1} | " + " | ".join(f"{weight:.3f}" for weight in weights) + " |"
            for layer, weights in enumerate(entry["mean"])
        ]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def figure(gates: dict[str, dict]) -> Any:
    """A matplotlib `Figure` of heat maps (text layer x backbone stage) of the mean gate weights, one panel per image
    group with a present image, at 150 dpi. It is open in pyplot: close it with `plotting.pyplot().close(figure)`."""
    plt = pyplot()
    shown = {group: entry for group, entry in gates.items() if entry["mean"] is not None}
    num_layers = len(next(iter(shown.values()))["mean"])
    # One color scale for both panels, spanning the weights (the cells print their values).
    all_weights = torch.tensor([entry["mean"] for entry in shown.values()])
    low, high = all_weights.min().item(), all_weights.max().item()
    heat_maps, axes = plt.subplots(
        1,
        len(shown),
        figsize=(3.2 * len(shown) + 0.8, 0.3 * num_layers + 1.5),
        dpi=150,
        squeeze=False,
        layout="constrained",
    )
    for axis, (group, entry) in zip(axes[0], shown.items(), strict=True):
        weights = torch.tensor(entry["mean"])
        image = axis.imshow(weights.numpy(), vmin=low, vmax=high, cmap="viridis", aspect="auto")
        for layer, row in enumerate(weights.tolist()):
            for stage, weight in enumerate(row):
                axis.text(stage, layer, f"{weight:.2f}", ha="center", va="center", fontsize=7, color="w")
        axis.set_xticks(range(weights.shape[1]), [f"{stage + 1}" for stage in range(weights.shape[1])])
        axis.set_yticks(range(weights.shape[0]), [f"{layer + 1}" for layer in range(weights.shape[0])])
        axis.set_xlabel("backbone stage")
        axis.set_ylabel("text layer")
        axis.set_title(f"{group} ({entry['images']})")
    heat_maps.colorbar(image, ax=axes, label="mean gate weight")
    return heat_maps


def plot(gates: dict[str, dict], path: Path) -> None:
    """Writes the heat maps of `figure` to the image file `path`."""
    heat_maps = figure(gates)
    heat_maps.savefig(path)
    pyplot().close(heat_maps)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)
    parser.add_argument("--output_dir", default="outputs/gates")
    args = parser.parse_args(argv)
    check_arguments(args)
    task, processor, model = load_model(args.model)
    gates = mean_gates(model, processor, load_examples(task, args), args.batch_size)
    output_dir = Path(args.output_dir)
    write_report(output_dir, "gates", markdown(gates), {"model": args.model, "split": args.split, "gates": gates})
    plot(gates, output_dir / "gates.png")
    return gates


if __name__ == "__main__":
    main()
