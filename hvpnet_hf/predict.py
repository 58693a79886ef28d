"""
`hvpnet-predict`: runs a trained HVPNeT model over a file of examples, in its published format or as a data set of
your own (JSON lines, CSV or Parquet), and writes the predictions.

    hvpnet-predict --model outputs/t15 --input data/twitter2015/test.txt --image_dir data/twitter2015_images \\
        --output t15_test_predictions.txt
    hvpnet-predict --model outputs/mnre --input data/txt/ours_test.txt --image_dir data/img_org \\
        --object_dir data/img_vg --output mnre_test.jsonl

Image and crop folders are found as the example scripts find them, for the input's split
(`hvpnet_hf.loading.find_file_layout`): a folder laid out per split (`img_org/{train,val,test}/`,
`img_vg/{train,val,test}/crops/`) gives the folder of the input's split, read from the input's name (`ours_test.txt`,
`valid.txt`); the crop map `*_<split>_dict.pth` is found next to the input file, or named with `--object_map`.

An input ending in .json, .jsonl, .csv or .parquet is read as a data set of your own, as the example scripts read
one (`hvpnet_hf.data_sources`): its columns are named by `--text_column_name`, `--label_column_name`,
`--image_column_name`, `--objects_column_name` and, for RE, `--head_column_name` and `--tail_column_name`; its images
are paths (relative ones to the input's folder) or `Image()` values, and its labels are the model's. It is streamed:
read a batch at a time as the predictions are made, never held whole; its missing images are counted and logged
at the end.

    hvpnet-predict --model outputs/t15 --input posts.jsonl --text_column_name words --output posts_predictions.txt

The task follows from the model. NER input: `IMGID:` blocks of `token<TAB>label` lines (Twitter-2015/2017); output:
CoNLL columns `word gold predicted`, a blank line after each sentence (whitespace inside a word is written as `_`,
an empty word as `_`, so that every line has three columns). RE input: one MNRE record per line; output:
one JSON object per example with the entity pair, the gold and the predicted relation and its probability (with
`--top_k`, the k best relations). Grounded NER input: Twitter-GMNER's text file with `--xml_dir`, its box files (the
gold regions), and the candidate regions of its images: the crops of `--object_dir` with their boxes file
(`objects_<split>_boxes.json` next to the crop map, or `--candidate_boxes`), or `--candidate_boxes` alone (the crops
are cut from the images at the boxes); the model's `num_object_images` first candidates are read. Output: one JSON
object per tweet with its `id`, `image_id`, `tokens`, `gold` entities and predicted `entities`, each with its words
(`start`, `end`, `text`), `type`, `box` (in image pixels, or null for none) and `region_score`. Every input example
gets exactly one output entry, in input order. The file's own labels are only copied to the output; when they are
present the entity, relation or GMNER / MNER / EEG scores are printed too.

    hvpnet-predict --model outputs/gmner --input GMNER/Twitter10000_v2.0/txt/test.txt \\
        --xml_dir GMNER/Twitter10000_v2.0/xml --image_dir data/twitter_images \\
        --object_dir data/gmner_objects/test/crops --object_map data/gmner_objects/objects_test_dict.pth \\
        --output gmner_test.jsonl

`--dtype bfloat16` loads the model in bfloat16; `--num_workers N` reads, decodes and tokenizes the examples in N
worker processes while the model runs.

Predictions are written as they are made, to `<output>.partial`, renamed to `--output` when the last is written. A
stopped run leaves that file and its settings (`<output>.run.json`): the same command resumes it, predicting only the
examples not yet written; a rerun with other settings (model, input, --dtype, ...) is refused. Under `torchrun` or
`accelerate launch` (RANK, WORLD_SIZE), each process predicts the examples i with i % WORLD_SIZE == RANK into a shard
`<output>.shard<RANK>-of-<WORLD_SIZE>`, and the last one to finish merges the shards into --output, in input order;
`--merge` merges them after a crash.

    torchrun --nproc_per_node 2 -m hvpnet_hf.predict --model outputs/t15 --input posts.jsonl --output posts.txt
    hvpnet-predict --merge --output posts.txt

Before the model runs, the command refuses an `--output` it could not write (a folder, or a file in a folder that
does not exist), a `--top_k` above the model's number of relations (and `--top_k` or `--rel2id` for an NER
or grounding model), a grounding model without `--xml_dir` or with crops but no boxes file, and an `--image_dir`
that holds none of the input's images (leave it out to predict from the text only; some missing images are masked
and counted).
"""

import argparse
import glob
import itertools
import json
import logging
import os
from collections.abc import Callable, Hashable, Iterator, Mapping
from pathlib import Path
from typing import Any

import evaluate
import torch
from datasets import Dataset, IterableDataset
from torch.utils.data import DataLoader
from transformers import AutoConfig, pipeline

from .data_sources import COLUMN_FLAGS, IMAGE_COLUMNS, TASK_COLUMNS, ImageCounts, is_table_file, stream_table_dataset
from .grounding_data import candidate_boxes_file, load_gmner_dataset
from .image_processing_hvpnet import decode_image
from .loading import (
    NO_RELATION,
    SPLIT_ALIASES,
    check_images_found,
    find_file_layout,
    load_mner_dataset,
    load_mre_dataset,
    split_of_file,
)
from .metrics import metric_path
from .output_files import atomic_write, check_output_file
from .pipelines import task_of  # importing it registers the pipelines
from .prediction_files import (
    GMNER_RECORDS,
    NER_RECORDS,
    RE_RECORDS,
    PredictionWriter,
    conll_word,
    gmner_record,
    interleave_records,
    iter_conll,
    ner_record,
    re_record,
)
from .tasks import TASKS

logger = logging.getLogger(__name__)

# Workers hide at most the time spent reading the inputs, and each is a process of its own (see docs/inference.md).
DEFAULT_NUM_WORKERS = 0
# The pipeline input keys of each task and the columns of the loaded examples they are read from.
NER_INPUT_COLUMNS = {"words": "tokens", "image": "image", "objects": "objects"}
RE_INPUT_COLUMNS = {**NER_INPUT_COLUMNS, "head": "head", "tail": "tail"}
GMNER_INPUT_COLUMNS = {**NER_INPUT_COLUMNS, "boxes": "candidate_boxes"}
# What the `gmner_f1` metric reads of a gold entity and of a predicted one.
GOLD_KEYS, PREDICTED_KEYS = ("start", "end", "type", "boxes"), ("start", "end", "type", "box")
# How each task's prediction file is read record by record (to resume a run and merge shards).
RECORD_FORMATS = {"ner": NER_RECORDS, "re": RE_RECORDS, "gmner": GMNER_RECORDS}
# The flags that do not change a run's predictions: a rerun may change them and still resume it.
RUN_ONLY_SETTINGS = ("output", "batch_size", "num_workers", "merge")
# The flags that name files or folders: a run's settings hold their absolute paths.
PATH_SETTINGS = ("input", "image_dir", "object_dir", "object_map", "rel2id", "xml_dir", "candidate_boxes")


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="hvpnet-predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="folder (or Hub id) of a trained HVPNeT model")
    parser.add_argument(
        "--input",
        help="data file: JSON lines, CSV or Parquet (.json, .jsonl, .csv, .parquet) read as a data set of your own, "
        "any other in the published format",
    )
    parser.add_argument("--output", required=True, help="file to write the predictions to")
    parser.add_argument(
        "--image_dir", help="folder of the images named in the input file, flat or per split (none: text only)"
    )
    parser.add_argument("--object_dir", help="folder of the object crops, flat or per split")
    parser.add_argument(
        "--object_map", help="torch.save'd crop map of this file (default: *_<split>_dict.pth next to --input)"
    )
    parser.add_argument("--rel2id", help="RE: JSON {relation: id} of the data set (to read its gold labels)")
    parser.add_argument("--xml_dir", help="grounded NER: the release's xml/ folder of box files (the gold regions)")
    parser.add_argument(
        "--candidate_boxes",
        help="grounded NER: JSON {image file name: [[xmin, ymin, xmax, ymax], ...]} of the candidate regions "
        "(default: objects_<split>_boxes.json next to the crop map)",
    )
    parser.add_argument("--missing_images", choices=["mask", "error"], default="mask")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "auto"],
        default="float32",
        help="the dtype the model runs in (auto: the one it was saved in)",
    )
    parser.add_argument(
        "--num_workers",
        type=int,
        default=DEFAULT_NUM_WORKERS,
        help="processes that decode the images and tokenize while the model runs (0: all in this process)",
    )
    parser.add_argument("--top_k", type=int, default=None, help="RE: write the k most probable relations")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="only merge the shards of --output that the processes of a run left whole (after a crash)",
    )
    columns = parser.add_argument_group(
        "columns of a data set of your own (default: the loaders' names: tokens, ner_tags or relation, image, "
        "objects, head, tail)"
    )
    for flag in dict.fromkeys(COLUMN_FLAGS.values()):
        columns.add_argument(f"--{flag}")
    args = parser.parse_args(argv)
    if args.merge and (args.model or args.input):
        parser.error("--merge reads the run's settings from its shards: give it only --output")
    if not args.merge and not (args.model and args.input):
        parser.error("the following arguments are required: --model, --input")
    for name, minimum in (("batch_size", 1), ("num_workers", 0), ("top_k", 1)):
        value = getattr(args, name)
        if value is not None and value < minimum:
            parser.error(f"--{name} must be at least {minimum}, got {value}")
    return args


def bio_tags(entities: list[dict], num_words: int) -> list[str]:
    """BIO tags of one sentence from the pipeline's entities."""
    tags = ["O"] * num_words
    for entity in entities:
        tags[entity["word_start"]] = f"B-{entity['entity_group']}"
        for index in range(entity["word_start"] + 1, entity["word_end"]):
            tags[index] = f"I-{entity['entity_group']}"
    return tags


def load_input(args: argparse.Namespace, task: str) -> Dataset:
    """
    The input file's examples, read by the loader of `task` with the images and crops of its split (see
    `find_file_layout`), for grounded NER with their gold boxes and the model's number of candidates (see
    `candidate_boxes_of`); an `--image_dir` that holds none of their images is an error (see `check_images_found`).
    """
    sources = find_file_layout(args.input, args.image_dir, args.object_dir, args.object_map)
    loaded = {"missing_images": args.missing_images, **sources}
    if task == "ner":
        examples = load_mner_dataset(**loaded)["test"]
    elif task == "re":
        examples = load_mre_dataset(**loaded, rel2id=args.rel2id)["test"]
    else:
        num_candidates = AutoConfig.from_pretrained(args.model).num_object_images
        candidate_boxes = candidate_boxes_of(args, sources["object_maps"])
        examples = load_gmner_dataset(
            **loaded, xml_dir=args.xml_dir, candidate_boxes=candidate_boxes, num_candidates=num_candidates
        )["test"]
    if sources["image_dir"] is not None:
        text_only = "leave --image_dir out to predict from the text only"
        check_images_found(examples, f"--input {args.input}", sources["image_dir"], "--image_dir", text_only)
    return examples


def candidate_boxes_of(args: argparse.Namespace, object_maps: Mapping[str, str] | None) -> dict[str, str] | None:
    """
    The candidate boxes file of the input, as `load_gmner_dataset` takes it: `--candidate_boxes`, or the boxes file
    `hvpnet-extract-objects` wrote next to the input's crop map (`candidate_boxes_file`); None without crops (no
    candidates). Crops without their boxes file are an error: a crop is grounded by its box.
    """
    if args.candidate_boxes is not None:
        return {"test": args.candidate_boxes}
    if object_maps is None:
        return None
    crop_map = Path(object_maps["test"])
    split = split_of_file(crop_map)
    boxes = None if split is None else candidate_boxes_file(crop_map.parent, SPLIT_ALIASES[split][0])
    if boxes is None or not boxes.is_file():
        raise FileNotFoundError(
            f"--object_dir {args.object_dir}: a grounding model needs each crop's box, and the crop map {crop_map} has "
            f"no boxes file next to it ({boxes or 'objects_<split>_boxes.json'}); name it with --candidate_boxes"
        )
    return {"test": str(boxes)}


def stream_own_input(args: argparse.Namespace, task: str) -> tuple[IterableDataset, ImageCounts]:
    """
    The examples of a JSON lines, CSV or Parquet input, in the loaders' columns with the model's labels, read as
    they are iterated (see `stream_table_dataset`), and the counts of their images, filled as they are read.
    """
    release_flags = [
        f"--{name}" for name in ("image_dir", "object_dir", "object_map", "rel2id") if getattr(args, name)
    ]
    if release_flags:
        raise ValueError(
            f"{', '.join(release_flags)}: settings of the published formats; --input {args.input} names its images "
            "in its columns (--image_column_name, --objects_column_name)"
        )
    columns = {column: getattr(args, COLUMN_FLAGS[column]) or column for column in TASK_COLUMNS[task]}
    splits, images = stream_table_dataset(
        task,
        columns,
        data_files={"test": args.input},
        label_names=list(AutoConfig.from_pretrained(args.model).id2label.values()),
        missing_images=args.missing_images,
    )
    return splits["test"], images


def share_rows(examples: IterableDataset, rank: int, world_size: int) -> Iterator[dict[str, Any]]:
    """
    The rows i of a stream with i % world_size == rank, in order. `IterableDataset.iter` reads the whole stream in
    any process (iterated in a DataLoader worker, a stream gives that worker only its own files).
    """
    for index, batch in enumerate(examples.iter(batch_size=1)):
        if index % world_size == rank:
            yield {column: values[0] for column, values in batch.items()}


def decoded_images(value: Any) -> Any:
    """
    An image value, or a list of them (a post's pictures, its crops), decoded (see `decode_image`); a value that
    cannot be decoded is kept, for the pipeline to mask or refuse under `--missing_images`.
    """
    if isinstance(value, list):
        return [decoded_images(item) for item in value]
    try:
        return decode_image(value)
    except OSError:
        return value


class StreamShare(torch.utils.data.IterableDataset):
    """
    This process's share of a streamed input (see `share_rows`) after its first `skip` rows, which are read but not
    decoded, with the images of the others decoded. In a DataLoader of n workers, worker w decodes the rows k (counted
    after the skipped ones) with k % n == w, so the DataLoader, which takes one row from each worker in turn, gives
    them in input order. Every worker reads the whole stream; the first reports the input's missing images when it
    ends (`ImageCounts.report`).
    """

    def __init__(self, examples: IterableDataset, images: ImageCounts, rank: int, world_size: int, skip: int):
        self.examples, self.images = examples, images
        self.rank, self.world_size, self.skip = rank, world_size, skip

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = torch.utils.data.get_worker_info()
        worker_id, num_workers = (0, 1) if worker is None else (worker.id, worker.num_workers)
        rows = itertools.islice(share_rows(self.examples, self.rank, self.world_size), self.skip, None)
        for position, row in enumerate(rows):
            if position % num_workers == worker_id:
                yield {**row, **{column: decoded_images(row[column]) for column in IMAGE_COLUMNS}}
        if worker_id == 0:
            self.images.report("leave the image column out to predict from the text only")


def streamed_predictions(args: argparse.Namespace, task: str, share: StreamShare) -> Iterator[tuple[dict, Any]]:
    """Each row of `share`, read by `--num_workers` DataLoader workers, with its pipeline output, in order."""
    rows, pipeline_rows = itertools.tee(DataLoader(share, batch_size=None, num_workers=args.num_workers))
    runner, columns, top_k = task_runner(args, task)
    inputs = ({key: row[column] for key, column in columns.items()} for row in pipeline_rows)
    # The pipeline reads a generator in this process: the workers above have decoded its images.
    outputs = runner(inputs, **top_k, **{**call_arguments(args), "num_workers": 0})
    return zip(rows, outputs, strict=True)


def task_runner(args: argparse.Namespace, task: str) -> tuple[Any, Mapping[str, str], dict[str, int]]:
    """The task's pipeline, the columns its inputs are read from and its call settings (`top_k` for RE)."""
    runner = pipeline(TASKS[task].pipeline_task, model=args.model, dtype=args.dtype, device=local_device())
    columns = {"ner": NER_INPUT_COLUMNS, "re": RE_INPUT_COLUMNS, "gmner": GMNER_INPUT_COLUMNS}[task]
    return runner, columns, ({"top_k": args.top_k or 1} if task == "re" else {})


class PipelineInputs(torch.utils.data.Dataset):
    """
    The pipeline input of the examples at `indices`, by position: `columns` maps an input key to the column it is
    read from. An indexable input lets the pipeline's DataLoader workers read the examples (a generator is read in
    one process).
    """

    def __init__(self, examples: Dataset, columns: Mapping[str, str], indices: range):
        self.examples = examples
        self.columns = columns
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict[str, Any]:
        row = self.examples[self.indices[position]]
        return {key: row[column] for key, column in self.columns.items()}


class GroundingInputs(PipelineInputs):
    """The `multimodal-gmner` inputs of the examples: an example whose image is masked and that has no crops has no
    candidates (nothing to cut its boxes from), so its entities' regions are none."""

    def __getitem__(self, position: int) -> dict[str, Any]:
        inputs = super().__getitem__(position)
        if inputs["image"] is None and not inputs["objects"]:
            inputs["boxes"] = None
        return inputs


def call_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """What both tasks pass to the pipeline call."""
    return {"batch_size": args.batch_size, "num_workers": args.num_workers, "missing_images": args.missing_images}


def process_share() -> tuple[int, int]:
    """This process's rank and the number of processes, as `torchrun` and `accelerate launch` set them."""
    share = {}
    for name, default in (("RANK", 0), ("WORLD_SIZE", 1)):
        value = os.environ.get(name, str(default))
        if not value.isdigit():
            raise ValueError(f"the environment variable {name} must be a whole number, got {value!r}")
        share[name] = int(value)
    if not share["RANK"] < share["WORLD_SIZE"]:
        raise ValueError(f"RANK {share['RANK']} must be below WORLD_SIZE {share['WORLD_SIZE']}")
    return share["RANK"], share["WORLD_SIZE"]


def shard_path(output: str | os.PathLike, rank: int, world_size: int) -> Path:
    """The file one process writes: the output itself for one process, else `<output>.shard<rank>-of-<world_size>`."""
    output = Path(output)
    return output if world_size == 1 else output.with_name(f"{output.name}.shard{rank}-of-{world_size}")


def settings_path(target: Path) -> Path:
    """The settings of the run writing `target` (a shard or the output), kept until the output is whole."""
    return target.with_name(f"{target.name}.run.json")


def file_identity(path: str | os.PathLike) -> dict[str, Any]:
    """A file's absolute path, size and modification time: a changed file is another input."""
    status = Path(path).stat()
    return {"path": str(Path(path).resolve()), "size": status.st_size, "mtime_ns": status.st_mtime_ns}


def run_settings(args: argparse.Namespace, task: str, world_size: int) -> dict[str, Any]:
    """
    What decides the predictions of a run and how they are split (the files of a model folder and the input by
    their size and modification time): a rerun resumes only a run of equal settings.
    """
    model = Path(args.model)
    settings = {name: value for name, value in vars(args).items() if name not in RUN_ONLY_SETTINGS}
    settings.update({name: str(Path(settings[name]).resolve()) for name in PATH_SETTINGS if settings[name]})
    if model.is_dir():
        settings["model"] = str(model.resolve())
        settings["model_files"] = [file_identity(path) for path in sorted(model.iterdir()) if path.is_file()]
    return {**settings, "input_file": file_identity(args.input), "task": task, "world_size": world_size}


def check_resumable(target: Path, settings: dict[str, Any]) -> None:
    """Refuses to go on with the unfinished run writing `target` when it had other settings (see `run_settings`)."""
    path = settings_path(target)
    if not path.is_file():
        return
    earlier = json.loads(path.read_text(encoding="utf-8"))
    changed = [name for name in dict.fromkeys([*earlier, *settings]) if earlier.get(name) != settings.get(name)]
    if changed:
        raise ValueError(
            f"--output {target} belongs to an unfinished run with other settings ({', '.join(changed)} differ, see "
            f"{path}): rerun it with the same settings to finish it, or remove {path} and {target}.partial to "
            "start over"
        )


def predict_shard(
    args: argparse.Namespace, task: str, target: Path, rank: int, world_size: int, settings: dict[str, Any]
) -> None:
    """
    Predicts this process's share of the input (the examples i with i % world_size == rank) into `target`, as the
    predictions are made; resumes an unfinished run, skipping the examples already written.
    """
    writer = PredictionWriter(target, RECORD_FORMATS[task])
    # The run's settings are written once its partial file is open, and it is renamed to the target when whole.
    if settings_path(target).is_file() and target.is_file() and not writer.partial.is_file():
        logger.info("%s is already whole", target)
        return
    key = example_key(task)
    streamed = is_table_file(args.input)
    if streamed:
        examples, images = stream_own_input(args, task)
        done = writer.resume(key(row) for row in share_rows(examples, rank, world_size))
    else:
        examples = load_input(args, task)
        share = range(rank, len(examples), world_size)
        done = writer.resume(key(examples[index]) for index in share)
    try:
        if done:
            logger.info("resuming %s after its first %d examples", writer.partial, done)
        with atomic_write(settings_path(target)) as temporary:
            temporary.write_text(json.dumps(settings, indent=1), encoding="utf-8")
        if streamed:
            predictions = streamed_predictions(args, task, StreamShare(examples, images, rank, world_size, done))
        else:
            share = share[done:]
            outputs = predicted_outputs(args, task, examples, share)
            predictions = zip((examples[index] for index in share), outputs, strict=True)
        record = predicted_records(args, task, examples)
        for example, output in predictions:
            writer.write(record(example, output))
        writer.finish()
    finally:
        writer.close()


def example_key(task: str) -> Callable[[Mapping[str, Any]], Hashable]:
    """What names an example in its prediction record (see `prediction_files.RecordFormat.key`)."""
    if task == "ner":
        return lambda example: tuple(conll_word(word) for word in example["tokens"])
    return lambda example: example["id"]  # RE and grounded NER


def predicted_outputs(args: argparse.Namespace, task: str, examples: Dataset, share: range) -> Iterator:
    """The pipeline's outputs for the examples at `share`, in order, made a batch at a time."""
    runner, columns, top_k = task_runner(args, task)
    inputs = (GroundingInputs if task == "gmner" else PipelineInputs)(examples, columns, share)
    return runner(inputs, **top_k, **call_arguments(args))


def predicted_records(
    args: argparse.Namespace, task: str, examples: Dataset | IterableDataset
) -> Callable[[Mapping[str, Any], Any], str]:
    """The record of an example and its pipeline output (`ner_record`, `re_record` or `gmner_record`)."""
    if task == "gmner":
        return lambda example, entities: gmner_record(example, [grounded_entity(entity) for entity in entities])
    if task == "ner":
        names = examples.features["ner_tags"].feature.names
        return lambda example, entities: ner_record(
            example["tokens"], [names[tag] for tag in example["ner_tags"]], bio_tags(entities, len(example["tokens"]))
        )
    names = examples.features["relation"].names
    return lambda example, relations: re_record(example, names[example["relation"]], relations, bool(args.top_k))


def grounded_entity(entity: Mapping[str, Any]) -> dict[str, Any]:
    """An entity of the `multimodal-gmner` pipeline in the words of its example: `start`, `end`, `type`, `box`,
    `region_score` (what `gmner_record` writes and the `gmner_f1` metric reads)."""
    return {
        "start": entity["word_start"],
        "end": entity["word_end"],
        "type": entity["entity_group"],
        "box": entity["box"],
        "region_score": entity["region_score"],
    }


def local_device() -> int:
    """The accelerator of this process: the `LOCAL_RANK`-th of its machine (the CPU where there is none)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def merge_shards(output: Path, world_size: int) -> None:
    """One output in input order from the `world_size` whole shards; removes the shards and their settings."""
    shards = [shard_path(output, rank, world_size) for rank in range(world_size)]
    task = json.loads(settings_path(shards[0]).read_text(encoding="utf-8"))["task"]
    total = interleave_records(shards, output, RECORD_FORMATS[task])
    for shard in shards:
        shard.unlink()
        settings_path(shard).unlink()
    logger.info("merged the %d shards of %s: %d examples", world_size, output, total)


def merge_if_whole(output: Path, world_size: int) -> bool:
    """
    Merges the shards when all are whole (the process that finishes last does it; a lock file keeps a second from
    merging at the same time); returns whether the output is whole.
    """
    shards = [shard_path(output, rank, world_size) for rank in range(world_size)]
    waiting = [str(shard) for shard in shards if not shard.is_file()]
    if waiting:
        logger.info("the output is merged by the last process to finish; still running: %s", ", ".join(waiting))
        return False
    lock = output.with_name(f"{output.name}.merging")
    try:
        os.close(os.open(lock, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        logger.warning("%s exists: another process merges the shards (if none does, run --merge)", lock)
        return False
    try:
        if not all(shard.is_file() for shard in shards):  # another process merged them meanwhile
            return False
        merge_shards(output, world_size)
    finally:
        lock.unlink()
    return True


def merge_command(output: Path) -> dict[str, Any]:
    """`--merge`: merges the whole shards of a run all of whose processes have ended; returns the run's settings."""
    found = sorted(output.parent.glob(f"{glob.escape(output.name)}.shard*-of-*.run.json"))
    world_sizes = {json.loads(path.read_text(encoding="utf-8"))["world_size"] for path in found}
    if len(world_sizes) != 1:
        raise FileNotFoundError(
            f"--merge: {output} needs the shards of one run, found the settings of "
            f"{len(world_sizes)} ({[str(path) for path in found]})"
        )
    world_size = world_sizes.pop()
    shards = [shard_path(output, rank, world_size) for rank in range(world_size)]
    unfinished = [str(shard) for shard in shards if not shard.is_file()]
    if unfinished:
        raise FileNotFoundError(
            f"--merge: {', '.join(unfinished)} not whole: rerun their processes (the same command, RANK and "
            f"WORLD_SIZE={world_size}); they resume"
        )
    settings = json.loads(settings_path(shards[0]).read_text(encoding="utf-8"))
    merge_shards(output, world_size)
    output.with_name(f"{output.name}.merging").unlink(missing_ok=True)
    return settings


def scores_of_output(output: Path, task: str, model: str) -> dict[str, float]:
    """
    The scores of a whole prediction file against the gold labels it holds (read one record at a time; the metric
    holds the labels of all of them).
    """
    if task == "gmner":
        return grounded_scores(output)
    if task == "ner":
        sentences = iter_conll(output)
        references, predictions = [], []
        for _, gold, predicted in sentences:
            references.append(gold)
            predictions.append(predicted)
        return evaluate.load(metric_path("ner_seqeval")).compute(predictions=predictions, references=references)
    label2id = AutoConfig.from_pretrained(model).label2id
    references, predictions = [], []
    with open(output, encoding="utf-8") as file:
        for line in file:
            record = json.loads(line)
            if record["gold"] not in label2id:
                logger.warning("the input has relations the model does not know: no scores computed")
                return {}
            references.append(label2id[record["gold"]])
            predictions.append(label2id[record["predicted"]])
    return evaluate.load(metric_path("re_micro_f1")).compute(
        predictions=predictions, references=references, none_id=label2id[NO_RELATION], num_labels=len(label2id)
    )


def grounded_scores(output: Path) -> dict[str, float]:
    """The GMNER, MNER and EEG scores (`gmner_f1`) of a grounded NER prediction file against its `gold` entities."""
    references, predictions = [], []
    with open(output, encoding="utf-8") as file:
        for line in file:
            record = json.loads(line)
            references.append([{key: gold[key] for key in GOLD_KEYS} for gold in record["gold"]])
            predictions.append([{key: found[key] for key in PREDICTED_KEYS} for found in record["entities"]])
    return evaluate.load(metric_path("gmner_f1")).compute(predictions=predictions, references=references)


def check_arguments(args: argparse.Namespace, task: str) -> None:
    """
    Refuses, before any example is read, an output file that could not be written, and relation settings that the
    model's task or relations do not allow.
    """
    if Path(args.output).resolve() == Path(args.input).resolve():
        raise ValueError(f"--output {args.output} would overwrite the input file")
    check_output_file(args.output, "--output")
    if task != "re":
        given = [f"--{name}" for name in ("top_k", "rel2id") if getattr(args, name) is not None]
        if given:
            what = "an NER" if task == "ner" else "a grounding"
            raise ValueError(f"{' and '.join(given)}: settings of relation models, but {args.model} is {what} model")
    grounding = [f"--{name}" for name in ("xml_dir", "candidate_boxes") if getattr(args, name) is not None]
    if task != "gmner" and grounding:
        raise ValueError(f"{' and '.join(grounding)}: settings of grounding models, but {args.model} is not one")
    if task == "gmner" and is_table_file(args.input):
        raise ValueError(f"--input {args.input}: a grounding model reads Twitter-GMNER's text files (IMGID: blocks)")
    if task == "gmner" and args.xml_dir is None:
        raise ValueError(
            f"--xml_dir: {args.model} is a grounding model, which reads the gold regions of --input {args.input} from "
            "its release's xml/ folder of box files"
        )
    if args.top_k is None:
        return
    num_relations = AutoConfig.from_pretrained(args.model).num_labels
    if args.top_k > num_relations:
        raise ValueError(f"--top_k must be at most {num_relations}, the relations of {args.model}; got {args.top_k}")


def predict(argv: list[str] | None = None) -> dict[str, float]:
    """
    Runs the command with `argv`; returns the scores against the file's own labels, computed by the process that
    makes the output whole (none in the others).
    """
    args = parse_arguments(argv)
    output = Path(args.output)
    if args.merge:
        check_output_file(output, "--output")
        settings = merge_command(output)
        task, model = settings["task"], settings["model"]
    else:
        task, model = task_of(args.model), args.model
        check_arguments(args, task)
        rank, world_size = process_share()
        target = shard_path(output, rank, world_size)
        settings = run_settings(args, task, world_size)
        check_resumable(target, settings)
        predict_shard(args, task, target, rank, world_size, settings)
        if world_size == 1:
            settings_path(target).unlink()
        elif not merge_if_whole(output, world_size):
            return {}
    logger.info("wrote %s", output)
    scores = scores_of_output(output, task, model)
    if scores:
        print(json.dumps({name: round(value, 4) for name, value in scores.items()}))
    return scores


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(format="%(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    predict(argv)


if __name__ == "__main__":
    main()
