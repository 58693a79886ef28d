"""Export a trained HVPNeT task model to ONNX, run it with onnxruntime, and decode NER emissions with its CRF.

    hvpnet-export-onnx --model MODEL_FOLDER --output ONNX_FOLDER

The ONNX graph takes `input_ids`, `attention_mask`, `token_type_ids` (B, T) int64, `pixel_values` (B, n, 3, S, S)
float32 (global image in slot 0, then the object crops) and `image_mask` (B, n) bool, with B and T dynamic, and
returns `logits`: the NER emissions (B, T, num_labels) or the relation logits (B, num_labels). The NER CRF decode
stays in Python (`HVPNetOnnxModel.predicted_tags`): its transitions are written beside the graph.
"""

import argparse
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchcrf import CRF

from .configuration_hvpnet import HVPNetConfig
from .file_utils import check_output_dir
from .modeling_hvpnet import HVPNetForSequenceClassification, HVPNetForTokenClassification, _word_positions
from .processing_hvpnet import HVPNetProcessor

ONNX_FILE = "model.onnx"
METADATA_FILE = "hvpnet_onnx.json"
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids", "pixel_values", "image_mask")
TASK_OF_ARCHITECTURE = {"HVPNetForTokenClassification": "ner", "HVPNetForSequenceClassification": "re"}


class HVPNetLogits(nn.Module):
    """The logits of a task model as one traceable graph.

    The heads' `forward` cannot be exported as they are: the NER head decodes its CRF in a Python loop, and the
    relation head checks that every row holds both entity markers, a data-dependent test. This module computes the
    same logits without them; `HVPNetOnnxModel` checks the markers before running the graph.
    """

    def __init__(self, model: HVPNetForTokenClassification | HVPNetForSequenceClassification):
        super().__init__()
        self.model = model
        self.is_ner = isinstance(model, HVPNetForTokenClassification)
        if not self.is_ner:
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
        hidden = self.model.hvpnet(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            pixel_values=pixel_values,
            image_mask=image_mask,
        ).last_hidden_state
        if self.is_ner:
            return self.model.classifier(self.model.dropout(hidden))
        if self.model.config.relation_pooling == "cls":
            features = hidden[:, 0]
        else:
            # The first marker of each kind, as the relation head reads it (argmax gives the first maximum).
            positions = [(input_ids == marker).int().argmax(dim=1) for marker in _marker_ids(self.model.config)]
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            features = torch.cat([hidden[rows, position] for position in positions], dim=-1)
        return self.model.classifier(self.model.dropout(features))


def load_task_model(model_folder: str | Path) -> HVPNetForTokenClassification | HVPNetForSequenceClassification:
    """The NER or RE model saved in `model_folder`, in eval mode."""
    config = HVPNetConfig.from_pretrained(model_folder)
    tasks = {TASK_OF_ARCHITECTURE.get(name) for name in config.architectures or []} - {None}
    if len(tasks) != 1:
        raise ValueError(
            f"{model_folder}: expected an HVPNeT NER or RE model, found architectures {config.architectures}"
        )
    model_class = HVPNetForTokenClassification if tasks.pop() == "ner" else HVPNetForSequenceClassification
    return model_class.from_pretrained(model_folder).eval()


def example_inputs(model: nn.Module, processor: HVPNetProcessor) -> dict[str, torch.Tensor]:
    """Two encoded examples of different lengths (so that batch and text length are traced as dynamic), their
    images random and one crop slot masked."""
    words = [["Kevin", "Durant", "enters", "Oracle", "Arena"], ["Alice", "visits", "Paris"]]
    if isinstance(model, HVPNetForTokenClassification):
        encoded = processor(words)
    else:
        spans = [{"start": 0, "end": 1}, {"start": 2, "end": 3}]
        encoded = processor(words, head=spans, tail=spans[::-1])
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
        "task": "ner" if isinstance(model, HVPNetForTokenClassification) else "re",
        "id2label": {str(index): label for index, label in config.id2label.items()},
        "relation_pooling": config.relation_pooling,
        "head_start_token_id": config.head_start_token_id,
        "tail_start_token_id": config.tail_start_token_id,
    }
    if metadata["task"] == "ner":
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

    `model(inputs)` takes the processor's output (tensors or arrays) and returns the logits as a NumPy array; for
    NER, `model.predicted_tags(inputs, emissions)` turns emissions into the word tags of
    `HVPNetForTokenClassification`.
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
        self.crf = None
        if self.task == "ner":
            self.crf = CRF(len(self.id2label), batch_first=True)
            state = {name: torch.tensor(values) for name, values in self.metadata["crf"].items()}
            self.crf.load_state_dict(state)

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

    def predicted_tags(self, inputs: Mapping, emissions: np.ndarray) -> torch.Tensor:
        """(B, T) the CRF's Viterbi tag ids at the first sub-word of every word and -100 elsewhere, as
        `HVPNetForTokenClassification.predicted_tags`; `inputs` gives `word_start_mask` and `attention_mask`."""
        if self.crf is None:
            raise ValueError("predicted_tags needs an NER model; this one is for relation extraction")
        word_start_mask = torch.as_tensor(np.asarray(inputs["word_start_mask"])).bool()
        word_start_mask &= torch.as_tensor(np.asarray(inputs["attention_mask"])).bool()
        emissions = torch.as_tensor(emissions).float()
        word_index, word_mask = _word_positions(word_start_mask)
        word_emissions = emissions.gather(1, word_index[..., None].expand(-1, -1, emissions.shape[-1]))
        tags = torch.full(word_start_mask.shape, -100, dtype=torch.long)
        rows = word_mask.any(dim=1).nonzero().flatten()  # pytorch-crf needs at least one word per sequence
        if len(rows):
            with torch.no_grad():
                paths = self.crf.decode(word_emissions[rows], mask=word_mask[rows])
            for row, path in zip(rows.tolist(), paths, strict=True):
                tags[row, word_index[row, : len(path)]] = torch.tensor(path)
        return tags


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
