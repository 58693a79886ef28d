"""
Entity-object attention as in the paper's Table 2: for one example, how much each entity's tokens attend to each
patch of each image's visual prefix, per text layer (mean over heads and over the entity's tokens; eager
attention). Writes `attention.md` and `attention.json` (per layer, entity and image slot: the attention mass) and the
heat map `attention.png` (a panel per layer: entities down, the image slots' prefix tokens across).

    python -m hvpnet_hf.analysis.attention --model outputs/demo/image_aware --index 3 --output_dir outputs/attention
"""

import argparse
from pathlib import Path

import torch
from datasets import Dataset

from ..collating import HVPNetDataCollator, tokenize_and_align
from ..pipelines import bio_entities
from .data import add_data_arguments, check_arguments, load_examples, load_model
from .gates import slot_presence
from .plotting import pyplot
from .reporting import write_report


def ner_entities(example: dict, word_ids: list[int], names: list[str]) -> dict[str, list[int]]:
    """`{"words (TYPE)": token positions}` of the example's gold entities (words cut by truncation have none)."""
    tags = [names[tag] for tag in example["ner_tags"]]
    entities = {}
    for kind, first, last in bio_entities(tags):
        positions = [position for position, word in enumerate(word_ids) if first <= word <= last]
        if positions:
            entities[f"{' '.join(example['tokens'][first : last + 1])} ({kind})"] = positions
    return entities


def re_entities(example: dict, input_ids: list[int], processor) -> dict[str, list[int]]:
    """`{"head: words" / "tail: words": positions}`: the tokens between the processor's head markers (`<s>`/`</s>`
    for BERT) and between its tail markers (`<o>`/`</o>`)."""
    entities = {}
    markers = processor.entity_markers
    for role, role_markers in (("head", markers[:2]), ("tail", markers[2:])):
        start_id, end_id = processor.tokenizer.convert_tokens_to_ids(list(role_markers))
        first, last = input_ids.index(start_id), input_ids.index(end_id)
        entities[f"{role}: {example[role]['name']}"] = list(range(first + 1, last))
    return entities


def first_example_with_entities_and_images(examples: Dataset, task: str) -> int:
    """The first example with an image (global or crop) and, for NER, a gold entity."""
    for index, example in enumerate(examples):
        has_image = example["image"] is not None or any(crop is not None for crop in example["objects"])
        if has_image and (task == "re" or any(tag != 0 for tag in example["ner_tags"])):
            return index
    raise ValueError("no example with an image and an entity")


@torch.no_grad()
def entity_attention(model, processor, examples: Dataset, index: int, task: str) -> dict:
    """
    For example `index`: its words, entities, image slots (name, present) and, per layer, the attention of every
    entity to every prefix token, `(entities, n * grid**2)`, plus each entity's attention mass on the text.
    """
    example = examples[index]
    encoded = examples.select([index]).map(tokenize_and_align, batched=True, fn_kwargs={"processor": processor})[0]
    batch = HVPNetDataCollator(processor)([encoded])
    batch.pop("labels")
    if task == "ner":
        entities = ner_entities(example, encoded["word_ids"], examples.features["ner_tags"].feature.names)
    else:
        entities = re_entities(example, encoded["input_ids"], processor)
    if not entities:
        raise ValueError(f"example {index} has no entity within the model's input")
    outputs = model(**batch, output_attentions=True)
    text_length = batch["input_ids"].shape[1]
    prefix_length = outputs.attentions[0].shape[-1] - text_length
    config = model.config
    tokens_per_image = config.prefix_grid**2
    if prefix_length == 0 or prefix_length % tokens_per_image:
        raise ValueError(f"{config.name_or_path}: no visual prefix of {tokens_per_image}-token images in the keys")
    num_slots = prefix_length // tokens_per_image
    names = (["global image"] if config.use_global_image else []) + [f"crop {i + 1}" for i in range(num_slots)]
    present = slot_presence(batch, config, num_slots)[0].tolist()
    layers = []
    for attention in outputs.attentions:  # (1, H, T, P + T)
        weights = attention[0].mean(dim=0)  # (T, P + T)
        rows = torch.stack([weights[positions].mean(dim=0) for positions in entities.values()])  # (E, P + T)
        layers.append({"prefix": rows[:, :prefix_length].tolist(), "text": rows[:, prefix_length:].sum(-1).tolist()})
    return {
        "index": index,
        "words": example["tokens"],
        "entities": list(entities),
        "slots": [{"name": name, "present": flag} for name, flag in zip(names[:num_slots], present, strict=True)],
        "tokens_per_image": tokens_per_image,
        "layers": layers,
    }


def slot_masses(result: dict, layer: dict) -> list[list[float]]:
    """(entities, slots) attention mass of each entity on each image (the sum over its prefix tokens)."""
    size = result["tokens_per_image"]
    return [
        [sum(row[slot * size : (slot + 1) * size]) for slot in range(len(result["slots"]))] for row in layer["prefix"]
    ]


def markdown(result: dict) -> str:
    slots = [slot["name"] + ("" if slot["present"] else " (absent)") for slot in result["slots"]]
    lines = [
        f"Example {result['index']}: {' '.join(result['words'])}",
        "",
        "Attention mass (%) of each entity's tokens on each image's prefix tokens and on the text, mean over heads.",
        "",
        "| layer | entity | " + " | ".join(slots) + " | text |",
        "|---" * (len(slots) + 3) + "|",
    ]
    for number, layer in enumerate(result["layers"], start=1):
        for entity, masses, text in zip(result["entities"], slot_masses(result, layer), layer["text"], strict=True):
            cells = [f"{100 * mass:.1f}" for mass in [*masses, text]]
            lines.append(f"| {number} | {entity} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """A heat map per layer: entities down, every image slot's prefix tokens across (slots labeled)."""
    plt = pyplot()
    num_layers, size = len(result["layers"]), result["tokens_per_image"]
    columns = min(num_layers, 4)
    rows = -(-num_layers // columns)
    num_tokens = size * len(result["slots"])
    width = 0.35 * num_tokens * columns + 3
    height = (0.4 * len(result["entities"]) + 1.5) * rows + 0.5
    figure, axes = plt.subplots(rows, columns, figsize=(width, height), squeeze=False, layout="constrained")
    vmax = max(max(max(row) for row in layer["prefix"]) for layer in result["layers"]) or 1.0
    for number, (axis, layer) in enumerate(zip(axes.flat, result["layers"], strict=False), start=1):
        image = axis.imshow(layer["prefix"], vmin=0.0, vmax=vmax, cmap="magma", aspect="auto")
        entity_labels = result["entities"] if (number - 1) % columns == 0 else []  # the first column names them
        axis.set_yticks(range(len(result["entities"])), entity_labels, fontsize=7)
        centers = [slot * size + (size - 1) / 2 for slot in range(len(result["slots"]))]
        labels = [slot["name"] + ("" if slot["present"] else "\n(absent)") for slot in result["slots"]]
        axis.set_xticks(centers, labels, fontsize=7)
        for boundary in range(1, len(result["slots"])):
            axis.axvline(boundary * size - 0.5, color="w", linewidth=1)
        axis.set_title(f"layer {number}", fontsize=9)
    for axis in list(axes.flat)[num_layers:]:
        axis.axis("off")
    figure.colorbar(image, ax=axes, label="attention (mean over heads)")
    figure.suptitle(" ".join(result["words"]), fontsize=8)
    figure.savefig(path, dpi=150)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)
    parser.add_argument("--index", type=int, help="example of the split (default: the first with an image and entity)")
    parser.add_argument("--output_dir", default="outputs/attention")
    args = parser.parse_args(argv)
    check_arguments(args)
    task, processor, model = load_model(args.model, attn_implementation="eager")
    examples = load_examples(task, args)
    index = first_example_with_entities_and_images(examples, task) if args.index is None else args.index
    if not 0 <= index < len(examples):
        raise ValueError(f"--index {index} is outside the {len(examples)} examples")
    result = entity_attention(model, processor, examples, index, task)
    output_dir = Path(args.output_dir)
    write_report(output_dir, "attention", markdown(result), {"model": args.model, **result})
    plot(result, output_dir / "attention.png")
    return result


if __name__ == "__main__":
    main()
