"""
Loader throughput on a synthetic MNRE split the size of the real training set (12,000 lines).

Writes the split in the published format (one Python literal per line) into a temporary folder, with 500 small
JPEG images shared between the lines and an index-keyed crop map (up to 3 crops per line), then times:
text-only loading, loading with image and crop checks, tokenization with `datasets.map`, and drawing batches with
the lazy image transform. Run: `HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_loading.py`.
"""

import random
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader
from transformers import BertTokenizer

from hvpnet_hf.collating import HVPNetDataCollator, ImageAttacher, tokenize_and_align
from hvpnet_hf.loading import load_mre_dataset
from hvpnet_hf.processing_hvpnet import HVPNetProcessor

NUM_LINES = 12_000
NUM_IMAGES = 500
RELATIONS = ["None", "/per/per/peer", "/per/org/member_of", "/org/loc/locate_at", "/misc/loc/held_on"]
WORDS = ["the", "team", "meets", "in", "paris", "with", "obama", "at", "harvard", "today", "#nba", "@user"]


def write_split(root: Path) -> None:
    rng = random.Random(0)
    images, crops = root / "img_org" / "train", root / "img_vg" / "train" / "crops"
    images.mkdir(parents=True)
    crops.mkdir(parents=True)
    for index in range(NUM_IMAGES):
        color = (index % 256, (7 * index) % 256, (13 * index) % 256)
        Image.new("RGB", (96, 64), color).save(images / f"img_{index}.jpg")
        Image.new("RGB", (32, 32), color).save(crops / f"crop_{index}.png")
    lines, crop_map = [], {}
    for index in range(NUM_LINES):
        tokens = [rng.choice(WORDS) for _ in range(rng.randint(8, 40))]
        head = rng.randrange(len(tokens) - 1)
        tail = rng.randrange(head + 1, len(tokens))
        record = {
            "token": tokens,
            "h": {"name": tokens[head], "pos": [head, head + 1]},
            "t": {"name": tokens[tail], "pos": [tail, tail + 1]},
            "img_id": f"img_{rng.randrange(NUM_IMAGES)}.jpg",
            "relation": rng.choice(RELATIONS),
        }
        lines.append(repr(record))
        crop_map[index] = [f"crop_{rng.randrange(NUM_IMAGES)}.png" for _ in range(rng.randint(0, 3))]
    (root / "mnre_train.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    torch.save(crop_map, root / "mre_train_dict.pth")


def timed(label: str, count: int, function):
    start = time.perf_counter()
    result = function()
    seconds = time.perf_counter() - start
    print(f"{label:<42} {seconds:7.2f} s  {count / seconds:10,.0f} examples/s")
    return result


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        write_split(root)
        data_files = {"train": root / "mnre_train.txt"}
        text_only = timed("load, text only", NUM_LINES, lambda: load_mre_dataset(data_files=data_files))
        with_images = timed(
            "load, image + crop checks",
            NUM_LINES,
            lambda: load_mre_dataset(
                data_files=data_files,
                image_dir=root / "img_org" / "train",
                object_dir=root / "img_vg" / "train" / "crops",
                object_maps={"train": root / "mre_train_dict.pth"},
            ),
        )
        assert len(text_only["train"]) == len(with_images["train"]) == NUM_LINES  # every line accounted for

        tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])})
        processor = HVPNetProcessor(tokenizer, task="re", image_size=64, max_length=48)
        encoded = timed(
            "tokenize + markers (datasets.map)",
            NUM_LINES,
            lambda: with_images["train"].map(
                tokenize_and_align, batched=True, fn_kwargs={"processor": processor}, load_from_cache_file=False
            ),
        )
        loader = DataLoader(
            encoded.with_transform(ImageAttacher(processor)),
            batch_size=32,
            collate_fn=HVPNetDataCollator(processor),
            num_workers=2,  # as Trainer's dataloader_num_workers; each worker decodes with one torch thread
        )
        num_batches = 20
        timed(
            f"draw {num_batches} batches of 32 (2 workers)",
            num_batches * 32,
            lambda: [batch for batch, _ in zip(loader, range(num_batches), strict=False)],
        )
        arrow_mb = encoded.data.nbytes / 2**20
        pixel_mb = NUM_LINES * (1 + processor.image_processor.num_object_images) * 3 * 224 * 224 * 4 / 2**20
        print(
            f"Arrow table: {arrow_mb:.1f} MB; float pixels at 224 px would need {pixel_mb:,.0f} MB "
            f"({pixel_mb / arrow_mb:,.0f}x)"
        )


if __name__ == "__main__":
    main()
