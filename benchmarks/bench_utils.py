"""What the benchmarks share: the paper's batch shape, the data sets' text lengths, a fresh process per measurement,
the training step `Trainer` runs, the mean step time, a profiled step and the peak memory of a process.

The scripts run as `python benchmarks/<name>.py`, so they import this module as a sibling (`import bench_utils`).
"""

import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch

# Paper appendix B (Chen et al., NAACL 2022 Findings): batch 8, text padded to 80 tokens, 1 global image + 3 object
# crops at 224 px.
BATCH_SIZE = 8
TEXT_LENGTH = 80
NUM_OBJECTS = 3
IMAGE_SIZE = 224
# (mean, 95th percentile, max) of word-piece lengths with [CLS] and [SEP], bert-base-uncased tokenizer.
REAL_LENGTHS = {"twitter2015": (42, 57, 70), "twitter2017": (20, 31, 56), "mnre": (31, 42, 55)}


def draw_lengths(generator: np.random.Generator, name: str, count: int) -> list[int]:
    """`count` text lengths from a normal with the data set's mean and 95th percentile, cut to [5, its maximum]."""
    mean, p95, longest = REAL_LENGTHS[name]
    lengths = generator.normal(mean, (p95 - mean) / 1.645, count).round()
    return [int(length) for length in lengths.clip(5, longest)]


def run_in_subprocess(script: str, arguments: list[str], python: str = sys.executable) -> dict:
    """Run `python script *arguments` in a fresh process, so that its peak memory is its own, and return the JSON
    object its last line of output holds."""
    result = subprocess.run([python, script, *arguments], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(arguments)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def trained_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters a training step updates (a frozen backbone's are left out)."""
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


def train_step(model: torch.nn.Module, autocast_dtype: torch.dtype | None = None) -> Callable[[dict], None]:
    """One training step on a batch of model inputs (labels included): forward, backward and an update by the
    optimizer `Trainer` builds by default (fused AdamW on CPU) over the trained parameters. With `autocast_dtype`
    the forward runs under CPU autocast to it, as `Trainer` runs it with `--bf16`."""
    from transformers import Trainer, TrainingArguments  # a training process imports them; inference does not

    with tempfile.TemporaryDirectory() as folder:
        optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(
            TrainingArguments(output_dir=folder, use_cpu=True, report_to="none")
        )
    optimizer = optimizer_cls(trained_parameters(model), **optimizer_kwargs)
    model.train()

    def step(batch: dict) -> None:
        with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def mean_seconds(step: Callable, batches: list[Callable]) -> float:
    """Mean seconds of `step` over the batches after the first (a warm-up); each batch is built just before its
    step, as a data loader would, so only one is held at a time."""
    timings = []
    for index, make in enumerate(batches):
        batch = make()
        start = time.perf_counter()
        step(batch)
        if index:
            timings.append(time.perf_counter() - start)
    return statistics.mean(timings)


def profiled_step(step: Callable, batch) -> tuple[float, list[tuple[str, float, int]]]:
    """Seconds of `step(batch)` under torch's CPU profiler, and its ten costliest operators by self time:
    (name, seconds, calls)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        start = time.perf_counter()
        step(batch)
        seconds = time.perf_counter() - start
    events = sorted(profiler.key_averages(), key=lambda event: -event.self_cpu_time_total)[:10]
    return seconds, [(event.key, event.self_cpu_time_total / 1e6, event.count) for event in events]


def rss_gib() -> float:
    """The resident memory of this process now."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**30


def peak_rss_gib(who: int = resource.RUSAGE_SELF) -> float:
    """The peak resident memory of this process so far, or with `resource.RUSAGE_CHILDREN` that of its largest
    child process that has ended (Linux reports `ru_maxrss` in KiB)."""
    return resource.getrusage(who).ru_maxrss / 2**20
