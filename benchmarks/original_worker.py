"""One measurement of the authors' HVPNeT code (zjunlp/HVPNeT) for `bench_original.py`, run by the Python of that
code's own environment. It never imports hvpnet_hf.

    <original venv>/bin/python benchmarks/original_worker.py --checkout HVPNeT --mode train --repeats 3

It builds their NER model (`models.bert_model.HMNeTNERModel`, bert-base size, torchvision resnet50, both random,
the prefix of `run_twitter15.sh`: `--use_prompt --prompt_len 4`, prompt_dim 800) and their optimizer and scheduler
(`modules.train.NERTrainer.multiModal_before_train`), and times what their loop does per batch:

- train: `model.train()`, forward with labels, `loss.backward()`, `optimizer.step()`, `scheduler.step()`,
  `optimizer.zero_grad()` (`NERTrainer.train`);
- inference: `model.eval()` and `torch.no_grad()`, forward with labels, as `NERTrainer.evaluate` calls it.

Their code loads pretrained weights and a tokenizer in its constructors and imports a metrics module that the
public repository lacks; here, without touching their files: BERT is built from `BertConfig()` (bert-base-uncased's
sizes), resnet50 with `weights=None`, and `modules.metrics` is an empty stand-in (only their RE evaluation reads it).
Prints one JSON line: mean seconds per step after one warm-up, peak RSS, the RSS after the imports and with the
model (and optimizer) built, parameter counts; or with `--profile`, the seconds of one step after a warm-up and its
costliest operators.
"""

import argparse
import json
import sys
import types

# The benchmarks' shared batch shape, timing and memory readings (torch and numpy, which their environment has).
import bench_utils

# Their label list (processor/dataset.py, `MMPNERProcessor.get_label_mapping`): PAD = 0, then these.
LABELS = ["PAD", "O", "B-MISC", "I-MISC", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "X", "[CLS]", "[SEP]"]
TRAIN_BATCHES_PER_EPOCH, EPOCHS = 500, 30  # only the scheduler's length reads them


def load_original(checkout: str) -> tuple:
    """Their NER model class and trainer class, importable without downloads."""
    sys.dont_write_bytecode = True  # leave their checkout as it is
    sys.path.insert(0, checkout)
    sys.modules["modules.metrics"] = types.SimpleNamespace(eval_result=None)
    import models.bert_model as bert_model
    import models.modeling_bert as modeling_bert
    import torchvision
    from modules.train import NERTrainer
    from transformers import BertConfig

    modeling_bert.BertModel.from_pretrained = classmethod(lambda cls, *args, **kwargs: cls(BertConfig()))
    bert_model.resnet50 = lambda pretrained=False, **kwargs: torchvision.models.resnet50(weights=None)
    return bert_model.HMNeTNERModel, NERTrainer


def make_batch(generator) -> tuple:
    """Random inputs in the order of their `NERTrainer._step`, every sentence 80 tokens: [CLS], words, [SEP]."""
    import torch

    text_shape = (bench_utils.BATCH_SIZE, bench_utils.TEXT_LENGTH)
    image_shape = (3, bench_utils.IMAGE_SIZE, bench_utils.IMAGE_SIZE)
    input_ids = torch.randint(1000, 20000, text_shape, generator=generator)
    labels = torch.randint(1, LABELS.index("X") + 1, text_shape, generator=generator)
    labels[:, 0], labels[:, -1] = LABELS.index("[CLS]"), LABELS.index("[SEP]")
    attention_mask = torch.ones(text_shape, dtype=torch.long)
    token_type_ids = torch.zeros(text_shape, dtype=torch.long)
    images = torch.randn(bench_utils.BATCH_SIZE, *image_shape, generator=generator)
    aux_imgs = torch.randn(bench_utils.BATCH_SIZE, bench_utils.NUM_OBJECTS, *image_shape, generator=generator)
    return input_ids, token_type_ids, attention_mask, labels, images, aux_imgs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", required=True, help="a checkout of zjunlp/HVPNeT")
    parser.add_argument("--mode", choices=["train", "inference"], required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="profile one step after a warm-up instead")
    args = parser.parse_args()

    import torch

    model_class, trainer_class = load_original(args.checkout)
    imports_gib = bench_utils.rss_gib()
    torch.manual_seed(0)
    settings = argparse.Namespace(
        prompt_len=4, prompt_dim=800, use_prompt=True, device="cpu", bert_name=None, lr=3e-5, warmup_ratio=0.01
    )
    settings.num_epochs = EPOCHS
    model = model_class(LABELS, settings)
    trainer = trainer_class(
        train_data=range(TRAIN_BATCHES_PER_EPOCH), model=model, args=settings, logger=None, label_map=None
    )
    trainer.multiModal_before_train()
    model_gib = bench_utils.rss_gib()
    generator = torch.Generator().manual_seed(0)

    def forward(batch: tuple):
        input_ids, token_type_ids, attention_mask, labels, images, aux_imgs = batch
        return model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            labels=labels,
            images=images,
            aux_imgs=aux_imgs,
        )

    def train(batch: tuple) -> None:
        loss = forward(batch).loss
        loss.backward()
        trainer.optimizer.step()
        trainer.scheduler.step()
        trainer.optimizer.zero_grad()

    def infer(batch: tuple) -> None:
        with torch.no_grad():
            forward(batch)

    model.train() if args.mode == "train" else model.eval()
    step = train if args.mode == "train" else infer
    if args.profile:
        step(make_batch(generator))
        total, operators = bench_utils.profiled_step(step, make_batch(generator))
        print(json.dumps({"phases": {"total": total}, "operators": operators}))
        return
    seconds = bench_utils.mean_seconds(step, [lambda: make_batch(generator)] * (args.repeats + 1))
    optimized = sum(p.numel() for group in trainer.optimizer.param_groups for p in group["params"])
    print(
        json.dumps(
            {
                "seconds": seconds,
                "peak_rss_gib": bench_utils.peak_rss_gib(),
                "imports_gib": imports_gib,
                "model_gib": model_gib,
                "parameters": sum(p.numel() for p in model.parameters()),
                "optimized_parameters": optimized,
            }
        )
    )


if __name__ == "__main__":
    main()
