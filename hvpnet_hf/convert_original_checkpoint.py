"""Convert a checkpoint of the authors' HVPNeT code (zjunlp/HVPNeT) into a model folder of this package.

    python -m hvpnet_hf.convert_original_checkpoint --task ner|re --checkpoint PATH --text_model NAME_OR_PATH \
        --output_dir DIR [--rel2id FILE] [--push_to_hub REPO]

`--checkpoint` is the `state_dict` the authors' training script saves; `--text_model` is the BERT it started from
(its configuration and tokenizer are read, never its weights). The folder written loads with the Auto classes and
uses `prefix_mode="original"`, so it computes what the original code computes:

- RE: exactly the same logits.
- NER: the original CRF runs over every sub-word position with four extra labels (`PAD`, `X`, `[CLS]`, `[SEP]`);
  this package's CRF runs over the first sub-word of each word with the nine BIO tags. The emissions and the
  transitions between BIO tags are copied; a tag's start score is start([CLS]) + transition([CLS] -> tag), its end
  score transition(tag -> [SEP]) + end([SEP]). The X positions inside multi-piece words are skipped, so decoding
  is an approximation of the original's (`tests/test_convert_original_checkpoint.py` measures how often the word tags agree).

Every checkpoint entry is either mapped or listed as unused by the original forward (BERT's pooler, the ResNet's
ImageNet classifier, the old `position_ids` buffer, the NER rows of `PAD`/`X`); anything else is an error, and so
is any model weight left without a value.
"""

import argparse
import json
import os
import re
from collections.abc import Mapping, Sequence

import torch
from transformers import AutoTokenizer, BertConfig, PreTrainedTokenizerBase

from .configuration_hvpnet import HVPNetConfig
from .loading import MNER_LABELS
from .model_card import push_output_dir_to_hub
from .modeling_hvpnet import HVPNetForSequenceClassification, HVPNetForTokenClassification, HVPNetPreTrainedModel
from .output_files import check_output_dir
from .processing_hvpnet import ENTITY_MARKERS, HVPNetProcessor

# The label list of the original NER code, in its id order.
ORIGINAL_NER_LABELS = [
    "PAD", "O", "B-MISC", "I-MISC", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "X", "[CLS]", "[SEP]",
]  # fmt: skip
ORIGINAL_BACKBONE = "resnet50"
ORIGINAL_NUM_OBJECT_IMAGES = 3
# The original image transform: bilinear resize to 224x224, ImageNet normalization.
ORIGINAL_IMAGE_SIZE = 224
# Dropout before the emission layer in the original NER model; its RE classifier has none.
ORIGINAL_NER_DROPOUT = 0.1
# Entries the original forward never reads.
UNUSED_PREFIXES = ("bert.pooler.", "image_model.resnet.fc.")
UNUSED_KEYS = ("bert.embeddings.position_ids",)
_ORIGINAL_CRF_KEYS = ("crf.start_transitions", "crf.end_transitions", "crf.transitions")


def load_original_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read the authors' saved `state_dict` (tensors only; nothing in the file is executed)."""
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, Mapping) or not all(
        isinstance(value, torch.Tensor) for value in state_dict.values()
    ):
        raise ValueError(f"{path}: expected a state_dict (a mapping of names to tensors), got {type(state_dict)}")
    return dict(state_dict)


def original_sizes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """The sizes the original layout fixes, read from the checkpoint's shapes."""
    required = [
        "bert.embeddings.word_embeddings.weight",
        "encoder_conv.0.weight",
        "encoder_conv.2.weight",
        "gates.0.weight",
    ]
    missing = [key for key in required if key not in state_dict]
    if missing:
        raise ValueError(f"Not a checkpoint of the original HVPNeT code (with visual prompts): no {missing}")
    vocab_size, hidden_size = state_dict["bert.embeddings.word_embeddings.weight"].shape
    num_stages, gate_inputs = state_dict["gates.0.weight"].shape
    return {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_layers": _count_indices(state_dict, "bert.encoder.layer."),
        "num_gates": _count_indices(state_dict, "gates."),
        "num_stages": num_stages,
        "gate_inputs": gate_inputs,
        "backbone_channels": state_dict["encoder_conv.0.weight"].shape[1],
        "mlp_outputs": state_dict["encoder_conv.2.weight"].shape[0],
    }


def _count_indices(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({match.group(1) for key in state_dict if (match := pattern.match(key))})


def build_config(
    task: str,
    text_config: BertConfig,
    sizes: Mapping[str, int],
    tokenizer: PreTrainedTokenizerBase,
    labels: Sequence[str],
) -> HVPNetConfig:
    """An `HVPNetConfig` in original mode whose text encoder matches the checkpoint; mismatches raise `ValueError`."""
    text_config = BertConfig.from_dict(text_config.to_dict())
    hidden, layers = sizes["hidden_size"], sizes["num_layers"]
    problems = []
    if text_config.hidden_size != hidden:
        problems.append(f"the checkpoint's BERT has hidden size {hidden}, the text model {text_config.hidden_size}")
    if text_config.num_hidden_layers != layers:
        problems.append(f"the checkpoint's BERT has {layers} layers, the text model {text_config.num_hidden_layers}")
    if sizes["num_gates"] != layers:
        problems.append(f"the checkpoint has {sizes['num_gates']} gates but its BERT has {layers} layers")
    if sizes["mlp_outputs"] != sizes["num_stages"] * 2 * hidden:
        problems.append(
            f"encoder_conv.2 produces {sizes['mlp_outputs']} features, not {sizes['num_stages']} gate chunks of "
            f"2 x hidden size {hidden}"
        )
    grid = round((sizes["gate_inputs"] / (2 * hidden)) ** 0.5)
    if grid**2 * 2 * hidden != sizes["gate_inputs"]:
        problems.append(
            f"gates take {sizes['gate_inputs']} inputs, not (grid x grid) tokens of 2 x hidden size {hidden}"
        )
    if len(tokenizer) != sizes["vocab_size"]:
        problems.append(
            f"the checkpoint's vocabulary has {sizes['vocab_size']} rows, the {task} tokenizer {len(tokenizer)} tokens"
        )
    if problems:
        raise ValueError("The checkpoint does not fit the text model: " + "; ".join(problems))
    text_config.vocab_size = len(tokenizer)

    if task == "ner":
        task_settings = {"classifier_dropout": ORIGINAL_NER_DROPOUT}
    else:
        task_settings = {
            "classifier_dropout": 0.0,
            "relation_pooling": "entity_markers",
            "head_start_token_id": tokenizer.convert_tokens_to_ids(ENTITY_MARKERS[0]),
            "tail_start_token_id": tokenizer.convert_tokens_to_ids(ENTITY_MARKERS[2]),
        }
    return HVPNetConfig(
        text_config=text_config,
        vision_backbone=ORIGINAL_BACKBONE,
        vision_pretrained=True,
        freeze_vision=True,
        num_object_images=ORIGINAL_NUM_OBJECT_IMAGES,
        use_global_image=True,
        prefix_grid=grid,
        prefix_mode="original",
        id2label=dict(enumerate(labels)),
        label2id={label: index for index, label in enumerate(labels)},
        **task_settings,
    )


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], task: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map the original names onto this package's. Returns the new state dict and the unused original keys;
    a key that is neither mapped nor known to be unused raises `ValueError`."""
    converted, unused, unknown = {}, [], []
    gate_keys = {"weight": [], "bias": []}
    for key, tensor in state_dict.items():
        if key in UNUSED_KEYS or key.startswith(UNUSED_PREFIXES):
            unused.append(key)
        elif key.startswith("bert."):
            converted["hvpnet.text_model." + key.removeprefix("bert.")] = tensor
        elif key.startswith("image_model.resnet."):
            converted["hvpnet.visual_encoder.backbone." + key.removeprefix("image_model.resnet.")] = tensor
        elif key.startswith("encoder_conv."):
            converted["hvpnet.visual_encoder." + key] = tensor
        elif (match := re.fullmatch(r"gates\.(\d+)\.(weight|bias)", key)) is not None:
            gate_keys[match.group(2)].append((int(match.group(1)), tensor))
        elif task == "re" and key.startswith("classifier."):
            converted[key] = tensor
        elif task == "ner" and key in ("fc.weight", "fc.bias", *_ORIGINAL_CRF_KEYS):
            continue  # converted together below
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"Checkpoint keys unknown to the original {task.upper()} layout: {unknown}")
    # The L gate layers, stacked in layer order as one linear layer (see HVPNetOriginalVisualPrefixEncoder).
    for name, indexed in gate_keys.items():
        layers = sorted(layer for layer, _ in indexed)
        if layers != list(range(len(layers))):
            raise ValueError(f"Checkpoint gates.*.{name} exist for layers {layers}, expected 0..{len(layers) - 1}")
        if indexed:
            converted[f"hvpnet.visual_encoder.gate.{name}"] = torch.cat([tensor for _, tensor in sorted(indexed)])
    if task == "ner":
        converted.update(convert_ner_head(state_dict))
        unused.append("fc.*, crf.*: the PAD, X, [CLS] and [SEP] states ([CLS]/[SEP] folded into start/end scores)")
    return converted, unused


def convert_ner_head(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The emission layer and word-level CRF over the nine BIO tags from the original sub-word CRF.

    Emissions and BIO-to-BIO transitions are copied. A sentence of the original starts in `[CLS]` and ends in
    `[SEP]`, so the word-level start score of a tag is start([CLS]) + transition([CLS] -> tag) and its end score
    transition(tag -> [SEP]) + end([SEP]).
    """
    missing = [key for key in ("fc.weight", "fc.bias", *_ORIGINAL_CRF_KEYS) if key not in state_dict]
    if missing:
        raise ValueError(f"NER checkpoint lacks {missing}")
    num_labels = state_dict["fc.weight"].shape[0]
    if num_labels != len(ORIGINAL_NER_LABELS) or state_dict["crf.transitions"].shape != (num_labels, num_labels):
        raise ValueError(
            f"fc has {num_labels} outputs and crf.transitions shape {tuple(state_dict['crf.transitions'].shape)}; "
            f"the original NER label list has {len(ORIGINAL_NER_LABELS)} labels: {ORIGINAL_NER_LABELS}"
        )
    tags = torch.tensor([ORIGINAL_NER_LABELS.index(label) for label in MNER_LABELS])
    first, last = ORIGINAL_NER_LABELS.index("[CLS]"), ORIGINAL_NER_LABELS.index("[SEP]")
    transitions = state_dict["crf.transitions"]
    return {
        "classifier.weight": state_dict["fc.weight"][tags],
        "classifier.bias": state_dict["fc.bias"][tags],
        "crf.transitions": transitions[tags][:, tags],
        "crf.start_transitions": state_dict["crf.start_transitions"][first] + transitions[first, tags],
        "crf.end_transitions": transitions[tags, last] + state_dict["crf.end_transitions"][last],
    }


def load_converted(model: HVPNetPreTrainedModel, converted: Mapping[str, torch.Tensor]) -> None:
    """Load `converted` into `model`, failing on any missing weight, extra key or shape mismatch."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(converted))
    extra = sorted(set(converted) - set(expected))
    mismatched = [
        f"{key}: checkpoint {tuple(tensor.shape)}, model {tuple(expected[key].shape)}"
        for key, tensor in converted.items()
        if key in expected and tensor.shape != expected[key].shape
    ]
    problems = [
        f"{what}: {items}"
        for what, items in (("missing", missing), ("unexpected", extra), ("shape mismatch", mismatched))
        if items
    ]
    if problems:
        raise ValueError("Converted checkpoint does not fit the model; " + "; ".join(problems))
    model.load_state_dict(converted, strict=True)


def read_relation_names(path: str | os.PathLike) -> list[str]:
    """Relation names in id order from a `rel2id` JSON file (`{"None": 0, "/per/per/parent": 1, ...}`)."""
    with open(path, encoding="utf-8") as file:
        rel2id = json.load(file)
    if not isinstance(rel2id, dict) or sorted(rel2id.values()) != list(range(len(rel2id))):
        raise ValueError(f"{path}: expected a JSON object mapping each relation name to a distinct id 0..n-1")
    return sorted(rel2id, key=rel2id.get)


def convert(
    task: str,
    checkpoint: str | os.PathLike,
    text_model: str | os.PathLike,
    output_dir: str | os.PathLike,
    rel2id: str | os.PathLike | None = None,
    push_to_hub: str | None = None,
) -> HVPNetPreTrainedModel:
    """
    Convert, save the model, its processor and pipeline code to `output_dir` (and optionally push the folder), return
    the model.
    """
    state_dict = load_original_state_dict(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(text_model)
    # The original squeezes every image to 224x224 without keeping the aspect ratio.
    processor = HVPNetProcessor(
        tokenizer,
        task=task,
        image_size=ORIGINAL_IMAGE_SIZE,
        crop_pct=1.0,
        crop_mode="squash",
        interpolation="bilinear",
        num_object_images=ORIGINAL_NUM_OBJECT_IMAGES,
    )
    if task == "ner":
        labels = list(MNER_LABELS)
    elif "classifier.weight" not in state_dict:
        raise ValueError(
            f"{checkpoint}: an RE checkpoint of the original code has classifier.weight; this one has not"
        )
    else:
        num_relations = state_dict["classifier.weight"].shape[0]
        if rel2id is not None:
            labels = read_relation_names(rel2id)
            if len(labels) != num_relations:
                raise ValueError(
                    f"{rel2id} names {len(labels)} relations, the checkpoint's classifier {num_relations}"
                )
        else:
            labels = [f"LABEL_{index}" for index in range(num_relations)]
            print(f"No --rel2id given: the {num_relations} relations are named LABEL_0..LABEL_{num_relations - 1}")
    config = build_config(
        task, BertConfig.from_pretrained(text_model), original_sizes(state_dict), processor.tokenizer, labels
    )
    model_class = HVPNetForTokenClassification if task == "ner" else HVPNetForSequenceClassification
    model = model_class(config)
    converted, unused = convert_state_dict(state_dict, task)
    load_converted(model, converted)
    print(f"Converted {len(state_dict)} checkpoint entries. Not kept (unused by the original forward, or folded):")
    for key in unused:
        print(f"  {key}")

    model.save_pretrained(output_dir)  # with its pipeline and the pipeline's code
    processor.save_pretrained(output_dir)
    if push_to_hub is not None:
        push_output_dir_to_hub(output_dir, push_to_hub)
    return model


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["ner", "re"], required=True)
    parser.add_argument("--checkpoint", required=True, help="the state_dict saved by the original code")
    parser.add_argument("--text_model", required=True, help="the BERT the checkpoint was trained from (name or path)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--rel2id", help="RE: the data set's rel2id JSON file, for the relation names")
    parser.add_argument("--push_to_hub", metavar="REPO", help="also upload the folder to this Hub repository")
    args = parser.parse_args(argv)
    if args.rel2id is not None and args.task != "re":
        parser.error("--rel2id applies to --task re only")
    check_output_dir(args.output_dir, "--output_dir")
    convert(args.task, args.checkpoint, args.text_model, args.output_dir, args.rel2id, args.push_to_hub)
    print(f"Saved to {args.output_dir}")


if __name__ == "__main__":
    main()
