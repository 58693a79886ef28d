"""Export a trained HVPNeT task model to ONNX, run it with onnxruntime, and decode NER emissions with its CRF.

    hvpnet-export-onnx --model MODEL_FOLDER --output ONNX_FOLDER

The ONNX graph takes `input_ids`, `attention_mask`, `token_type_ids` (B, T) int64, `pixel_values` (B, n, 3, S, S)
float32 (global image in slot 0, then the object crops) and `image_mask` (B, n) bool, with B and T dynamic, and
returns `logits`: the NER emissions (B, T, num_labels) or the relation logits (B, num_labels). `HVPNetOnnxModel.decode`
turns them into tags or relations with the decoders of the torch heads; the NER CRF's transitions are written beside
the graph.
"""

import argparse
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import modeling_hvpnet
from .configuration_hvpnet import HVPNetConfig
from .modeling_hvpnet import (
    HVPNetForSequenceClassification,
    HVPNetForTokenClassification,
    rank_relations,
    viterbi_decode,
)
from .output_files import check_output_dir
from .processing_hvpnet import HVPNetProcessor
from .tasks import NER, task_of_architectures

ONNX_FILE = "model.onnx"
METADATA_FILE = "hvpnet_onnx.json"
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids", "pixel_values", "image_mask")


class HVPNetLogits(nn.Module):
    """A task model with the graph's inputs, by position, and its logits as the one output. The relation head's
    check that every row holds both entity markers runs in eager mode only; `HVPNetOnnxModel` makes it before
    running the graph."""

    def __init__(self, model: HVPNetForTokenClassification | HVPNetForSequenceClassification):
        super().__init__()
        self.model = model
        if isinstance(model, HVPNetForSequenceClassification):
            _marker_ids(model.config)  # fails now, not at export, when the marker ids are not set

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        image_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Inputs as for the task models; returns NER emissions (B, T, num_labels) or RE logits (B, num_labels)."""
        return self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            pixel_values=pixel_values,
            image_mask=image_mask,
        ).logits


def load_task_model(model_folder: str | Path) -> HVPNetForTokenClassification | HVPNetForSequenceClassification:
    """The NER or RE model saved in `model_folder`, in eval mode."""
    task = task_of_architectures(HVPNetConfig.from_pretrained(model_folder).architectures, model_folder)
    return getattr(modeling_hvpnet, task.model_class).from_pretrained(model_folder).eval()


def example_inputs(model: nn.Module, processor: HVPNetProcessor) -> dict[str, torch.Tensor]:
    """Two encoded examples of different lengths (so that batch and text length are traced as dynamic), their
    images random and one crop slot masked."""
    words = [["Kevin", "Durant", "enters", "Oracle", "Arena"], ["Alice", "visits", "Paris"]]
    if isinstance(model, HVPNetForTokenClassification):
        encoded = processor(text=words)
    else:
        spans = [{"start": 0, "end": 1}, {"start": 2, "end": 3}]
        encoded = processor(text=words, head=spans, tail=spans[::-1])
    generator = torch.Generator().manual_seed(0)
    inputs = {name: encoded[name] for name in INPUT_NAMES if name in encoded}
    inputs.setdefault("token_type_ids", torch.zeros_like(inputs["input_ids"]))
    inputs["pixel_values"] = torch.randn(inputs["pixel_values"].shape, generator=generator)
    inputs["image_mask"] = torch.ones_like(inputs["image_mask"])
    inputs["image_mask"][1, -1] = False
    return inputs


def export_onnx(model_folder: str | Path, output_folder: str | Path) -> torch.onnx.ONNXProgram:
    """Export the task model in `model_folder` to `output_folder`: the graph (`model.onnx`), its metadata with the
    NER CRF transitions (`hvpnet_onnx.json`) and the processor. Returns the ONNX program, whose `exported_program`
    is the `torch.export` graph it was translated from."""
    model = load_task_model(model_folder)
    processor = HVPNetProcessor.from_pretrained(model_folder)
    inputs = example_inputs(model, processor)
    batch = torch.export.Dim("batch", min=1, max=1024)
    text = torch.export.Dim("text", min=2, max=model.config.text_config.max_position_embeddings)
    dynamic_shapes = {name: {0: batch, 1: text} for name in INPUT_NAMES[:3]}
    dynamic_shapes.update({"pixel_values": {0: batch}, "image_mask": {0: batch}})
    with torch.no_grad():
        program = torch.onnx.export(
            HVPNetLogits(model).eval(),
            (),
            kwargs=inputs,
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            output_names=["logits"],
        )
    output_folder = Path(output_folder)
    output_folder.mkdir(parents=True, exist_ok=True)
    program.save(str(output_folder / ONNX_FILE))
    (output_folder / METADATA_FILE).write_text(json.dumps(_metadata(model), indent=2) + "\n")
    processor.save_pretrained(output_folder)
    return program


def _metadata(model: nn.Module) -> dict:
    """What running the graph needs besides it: the task, labels, marker ids and the NER CRF."""
    config = model.config
    metadata = {
        "task": task_of_architectures([type(model).__name__], type(model).__name__).name,
        "id2label": {str(index): label for index, label in config.id2label.items()},
        "relation_pooling": config.relation_pooling,
        "head_start_token_id": config.head_start_token_id,
        "tail_start_token_id": config.tail_start_token_id,
    }
    if metadata["task"] == NER.name:
        metadata["crf"] = {
            name: getattr(model.crf, name).tolist() for name in ("start_transitions", "end_transitions", "transitions")
        }
    return metadata


def _marker_ids(config: HVPNetConfig) -> tuple[int, ...]:
    """The head and tail start marker ids of an entity-marker relation model (None for `[CLS]` pooling)."""
    if config.relation_pooling == "cls":
        return ()
    if config.head_start_token_id is None or config.tail_start_token_id is None:
        raise ValueError("config.head_start_token_id and tail_start_token_id must be set for entity-marker pooling")
    return config.head_start_token_id, config.tail_start_token_id


class HVPNetOnnxModel:
    """An exported HVPNeT graph in onnxruntime, with the metadata written beside it.

    `model(inputs)` takes the processor's output (tensors or arrays) and returns the logits as a NumPy array;
    `model.decode` turns them into what the torch head's `decode` gives: NER tags or ranked relations.
    """

    def __init__(self, folder: str | Path, providers: list[str] | None = None):
        import onnxruntime

        folder = Path(folder)
        self.metadata = json.loads((folder / METADATA_FILE).read_text())
        self.task = self.metadata["task"]
        self.id2label = {int(index): label for index, label in self.metadata["id2label"].items()}
        self.session = onnxruntime.InferenceSession(
            str(folder / ONNX_FILE), providers=providers or ["CPUExecutionProvider"]
        )

    def __call__(self, inputs: Mapping) -> np.ndarray:
        """inputs: `input_ids`, `attention_mask` (B, T), optional `token_type_ids` (B, T), `pixel_values`
        (B, n, 3, S, S), `image_mask` (B, n). Returns the logits (B, T, num_labels) for NER, (B, num_labels) for RE."""
        missing = [name for name in INPUT_NAMES if name not in inputs and name != "token_type_ids"]
        if missing:
            raise ValueError(f"the ONNX model needs the inputs {missing} (the processor's output has them)")
        feeds = {name: np.asarray(inputs[name]) for name in INPUT_NAMES if name in inputs}
        feeds.setdefault("token_type_ids", np.zeros_like(feeds["input_ids"]))
        for name in INPUT_NAMES[:3]:
            feeds[name] = feeds[name].astype(np.int64)
        feeds["pixel_values"] = feeds["pixel_values"].astype(np.float32)
        feeds["image_mask"] = feeds["image_mask"].astype(bool)
        if self.task == "re" and self.metadata["relation_pooling"] != "cls":
            for name in ("head_start_token_id", "tail_start_token_id"):
                lacking = np.flatnonzero(~(feeds["input_ids"] == self.metadata[name]).any(axis=1)).tolist()
                if lacking:
                    raise ValueError(f"RE input rows {lacking} lack the entity marker {name} = {self.metadata[name]}")
        return self.session.run(["logits"], feeds)[0]

    def decode(
        self, logits: np.ndarray, word_start_mask: np.ndarray | torch.Tensor | None = None, top_k: int | None = None
    ) -> torch.Tensor | list[list[dict]]:
        """NER: (B, T) the CRF's tag ids at the first sub-words that `word_start_mask` (B, T, the processor's)
        marks and -100 elsewhere, from the emissions, as `HVPNetForTokenClassification.decode`. RE: the `top_k`
        most probable relations of each row (all without it), as `HVPNetForSequenceClassification.decode`."""
        logits = torch.as_tensor(logits)
        if self.task != NER.name:
            return rank_relations(logits, self.id2label, top_k)
        if word_start_mask is None:
            raise ValueError("decoding NER emissions needs the inputs' word_start_mask")
        crf = {name: torch.tensor(values) for name, values in self.metadata["crf"].items()}
        return viterbi_decode(logits, torch.as_tensor(np.asarray(word_start_mask)).bool(), **crf)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export a trained HVPNeT NER or RE model folder to ONNX.")
    parser.add_argument("--model", required=True, help="folder written by save_pretrained (model and processor)")
    parser.add_argument("--output", required=True, help="folder for model.onnx, hvpnet_onnx.json and the processor")
    args = parser.parse_args(argv)
    check_output_dir(args.output, "--output")
    export_onnx(args.model, args.output)
    print(f"wrote {Path(args.output) / ONNX_FILE}, {METADATA_FILE} and the processor")


if __name__ == "__main__":
    main()
