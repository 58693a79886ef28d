"""`hvpnet-predict` over files in the published formats: one output entry per input example, in order."""

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import evaluate
import pytest
import torch
from modeling_utils import RELATIONS
from transformers import pipeline

import hvpnet_hf
from hvpnet_hf import data_sources, load_mner_dataset, load_mre_dataset
from hvpnet_hf.grounding_data import load_gmner_dataset
from hvpnet_hf.image_processing_hvpnet import decode_image
from hvpnet_hf.metrics import metric_path
from hvpnet_hf.pipelines import MultimodalGroundedNerPipeline, MultimodalNerPipeline, MultimodalRePipeline
from hvpnet_hf.predict import parse_arguments, predict
from hvpnet_hf.prediction_files import read_conll
from hvpnet_hf.sample_data import sample_sources

SAMPLE = hvpnet_hf.__path__[0] + "/sample_data"


def test_ner_predictions_cover_every_word(tiny_ner_dir, tmp_path):
    twitter = f"{SAMPLE}/twitter"
    output = tmp_path / "test_predictions.txt"
    scores = predict(
        [
            "--model", tiny_ner_dir,
            "--input", f"{twitter}/test.txt",
            "--image_dir", f"{twitter}/images",
            "--object_dir", f"{twitter}/aux_images/test/crops",
            "--object_map", f"{twitter}/twitter_test_dict.pth",
            "--output", str(output),
            "--batch_size", "8",
        ]
    )  # fmt: skip
    examples = load_mner_dataset(data_files={"test": f"{twitter}/test.txt"})["test"]
    seqeval = evaluate.load(metric_path("ner_seqeval"))
    sentences = output.read_text(encoding="utf-8").strip("\n").split("\n\n")
    assert len(sentences) == len(examples)
    names = examples.features["ner_tags"].feature.names
    gold_columns, predicted_columns = [], []
    for sentence, tokens, tags in zip(sentences, examples["tokens"], examples["ner_tags"], strict=True):
        rows = [line.split(" ") for line in sentence.split("\n")]
        assert [row[0] for row in rows] == tokens and [row[1] for row in rows] == [names[tag] for tag in tags]
        assert all(row[2] == "O" or row[2][:2] in ("B-", "I-") for row in rows)
        gold_columns.append([row[1] for row in rows])
        predicted_columns.append([row[2] for row in rows])
    # The printed scores are those of the written file: every sentence, paired with its own gold tags.
    assert scores == seqeval.compute(predictions=predicted_columns, references=gold_columns)


def test_re_predictions_one_line_per_record(tiny_re_dir, tmp_path):
    mnre = f"{SAMPLE}/mnre"
    output = tmp_path / "test.jsonl"
    scores = predict(
        [
            "--model", tiny_re_dir,
            "--input", f"{mnre}/txt/mnre_test.txt",
            "--image_dir", f"{mnre}/img_org/test",
            "--rel2id", f"{mnre}/mnre_rel2id.json",
            "--output", str(output),
            "--top_k", "2",
        ]
    )  # fmt: skip
    examples = load_mre_dataset(data_files={"test": f"{mnre}/txt/mnre_test.txt"}, rel2id=f"{mnre}/mnre_rel2id.json")
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [record["id"] for record in records] == examples["test"]["id"]
    for record in records:
        assert record["predicted"] in RELATIONS and len(record["top_k"]) == 2
        assert record["top_k"][0] == {"relation": record["predicted"], "score": record["score"]}
    # The sample set has relations this 4-relation model does not know: no scores rather than wrong ones.
    assert not set(RELATIONS) >= {record["gold"] for record in records} and scores == {}


def test_release_folders_and_crop_map_are_found_as_the_scripts_find_them(tiny_re_dir, tmp_path):
    mnre = f"{SAMPLE}/mnre"
    common = ["--model", tiny_re_dir, "--input", f"{mnre}/txt/mnre_test.txt", "--rel2id", f"{mnre}/mnre_rel2id.json"]
    spelled_out = tmp_path / "spelled_out.jsonl"
    predict(
        [*common, "--image_dir", f"{mnre}/img_org/test", "--object_dir", f"{mnre}/img_vg/test/crops",
         "--object_map", f"{mnre}/txt/mre_test_dict.pth", "--output", str(spelled_out)]
    )  # fmt: skip
    found = tmp_path / "found.jsonl"
    predict([*common, "--image_dir", f"{mnre}/img_org", "--object_dir", f"{mnre}/img_vg", "--output", str(found)])
    assert found.read_text() == spelled_out.read_text()


def test_refuses_to_overwrite_its_input(tiny_ner_dir, tmp_path):
    data = tmp_path / "test.txt"
    data.write_text("IMGID:1\nhello\tO\n\n")
    with pytest.raises(ValueError, match="would overwrite the input"):
        predict(["--model", tiny_ner_dir, "--input", str(data), "--output", str(data)])


def test_console_command_is_installed(tiny_ner_dir, tmp_path):
    scripts = {entry.name: entry.value for entry in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("hvpnet-predict") == "hvpnet_hf.predict:main"
    data = tmp_path / "tweets.txt"
    data.write_text("IMGID:1\nHello\tO\nLiverpool\tB-LOC\n\nIMGID:2\n@anna\tB-PER\n\n")
    command = shutil.which("hvpnet-predict", path=str(sys.executable.rsplit("/", 1)[0]))
    assert command is not None
    finished = subprocess.run(
        [command, "--model", tiny_ner_dir, "--input", str(data), "--output", str(tmp_path / "out.txt")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert (tmp_path / "out.txt").read_text().count("\n\n") == 2


def test_empty_and_spaced_words_keep_three_columns(tiny_ner_dir, tmp_path):
    data = tmp_path / "tweets.txt"
    # An empty word, a word of spaces only and a word with a space inside, each on its own token line.
    data.write_text("IMGID:1\nHello\tO\n\tO\nNew York\tB-LOC\n\nIMGID:2\n \tO\n@anna\tB-PER\n\n", encoding="utf-8")
    output = tmp_path / "out.txt"
    predict(["--model", tiny_ner_dir, "--input", str(data), "--output", str(output)])
    lines = [line for line in output.read_text(encoding="utf-8").splitlines() if line]
    assert all(len(line.split()) == 3 for line in lines)
    assert [line.split()[:2] for line in lines] == [
        ["Hello", "O"], ["_", "O"], ["New_York", "B-LOC"], ["_", "O"], ["@anna", "B-PER"]
    ]  # fmt: skip
    sentences = read_conll(output)
    assert [(words, gold) for words, gold, _ in sentences] == [
        (["Hello", "_", "New_York"], ["O", "O", "B-LOC"]),
        (["_", "@anna"], ["O", "B-PER"]),
    ]


def test_read_conll_names_a_broken_line(tmp_path):
    path = tmp_path / "predictions.txt"
    path.write_text("Hello O O\n O O\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"predictions.txt:2: expected 'word gold predicted'"):
        read_conll(path)


def test_batch_size_one_and_long_sentences_tag_every_word(tiny_ner_dir, tmp_path):
    data = tmp_path / "tweets.txt"
    long_sentence = "".join(f"w{index}\tB-PER\n" for index in range(300))  # far beyond max_length=24
    data.write_text(f"IMGID:1\nHello\tO\n\nIMGID:2\n{long_sentence}\nIMGID:3\n@anna\tB-PER\n\n", encoding="utf-8")
    outputs = {}
    for batch_size in ("1", "2", "8"):
        output = tmp_path / f"out_{batch_size}.txt"
        predict(["--model", tiny_ner_dir, "--input", str(data), "--output", str(output), "--batch_size", batch_size])
        outputs[batch_size] = output.read_text(encoding="utf-8")
    assert outputs["1"] == outputs["2"] == outputs["8"]
    sentences = outputs["1"].strip("\n").split("\n\n")
    assert [len(sentence.split("\n")) for sentence in sentences] == [1, 300, 1]
    assert all(len(line.split(" ")) == 3 for line in outputs["1"].splitlines() if line)


def stop_after(monkeypatch, pipeline_class, num_outputs: int) -> list[int]:
    """Makes the pipeline stop once, when asked for its output after `num_outputs` (as a killed run stops); returns
    the list that counts its outputs (clear it to count a rerun's)."""
    postprocess = pipeline_class.postprocess
    calls, stopped = [], []

    def stopping_postprocess(self, model_outputs, **parameters):
        calls.append(1)
        if len(calls) == num_outputs + 1 and not stopped:
            stopped.append(1)
            raise KeyboardInterrupt
        return postprocess(self, model_outputs, **parameters)

    monkeypatch.setattr(pipeline_class, "postprocess", stopping_postprocess)
    return calls


def write_tweets(path, count: int) -> None:
    """`count` text-only tweets of a few words, in the Twitter-2015 format."""
    blocks = [f"IMGID:{index}\nHello\tO\n@anna{index}\tB-PER\nin\tO\nParis\tB-LOC\n" for index in range(count)]
    path.write_text("\n".join(blocks) + "\n", encoding="utf-8")


def test_a_stopped_run_keeps_its_predictions_and_a_rerun_resumes_it(tiny_ner_dir, tmp_path, monkeypatch):
    data = tmp_path / "tweets.txt"
    write_tweets(data, 7)
    common = ["--model", tiny_ner_dir, "--input", str(data), "--batch_size", "2"]
    predict([*common, "--output", str(tmp_path / "uninterrupted.txt")])
    output = tmp_path / "out.txt"
    output.write_text("earlier\n")
    calls = stop_after(monkeypatch, MultimodalNerPipeline, 5)
    with pytest.raises(KeyboardInterrupt):
        predict([*common, "--output", str(output)])
    # The output is never partial: an earlier one stays; the 5 predictions made are in the partial file.
    assert output.read_text() == "earlier\n"
    assert len(read_conll(f"{output}.partial")) == 5
    calls.clear()
    predict([*common, "--output", str(output), "--batch_size", "3"])  # the batch size may change
    assert len(calls) == 2  # only the 2 examples left were predicted
    assert output.read_text() == (tmp_path / "uninterrupted.txt").read_text()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out.txt", "tweets.txt", "uninterrupted.txt"]


def test_a_record_cut_short_by_a_kill_is_written_again(tiny_re_dir, tmp_path, monkeypatch):
    mnre = f"{SAMPLE}/mnre"
    common = ["--model", tiny_re_dir, "--input", f"{mnre}/txt/mnre_test.txt", "--rel2id", f"{mnre}/mnre_rel2id.json",
              "--top_k", "2"]  # fmt: skip
    predict([*common, "--output", str(tmp_path / "uninterrupted.jsonl")])
    output = tmp_path / "out.jsonl"
    calls = stop_after(monkeypatch, MultimodalRePipeline, 10)
    with pytest.raises(KeyboardInterrupt):
        predict([*common, "--output", str(output)])
    partial = tmp_path / "out.jsonl.partial"
    lines = partial.read_text().splitlines(keepends=True)
    assert len(lines) == 10 and not output.exists()
    # A kill in the middle of a write leaves half a line.
    partial.write_text("".join(lines[:9]) + lines[9][:20])
    calls.clear()
    predict([*common, "--output", str(output)])
    num_examples = len((tmp_path / "uninterrupted.jsonl").read_text().splitlines())
    assert len(calls) == num_examples - 9
    assert output.read_text() == (tmp_path / "uninterrupted.jsonl").read_text()


def test_a_rerun_with_other_settings_is_refused(tiny_ner_dir, tiny_re_dir, tmp_path, monkeypatch):
    data = tmp_path / "tweets.txt"
    write_tweets(data, 4)
    model = tmp_path / "model"
    shutil.copytree(tiny_ner_dir, model)
    output = tmp_path / "out.txt"
    stop_after(monkeypatch, MultimodalNerPipeline, 2)
    with pytest.raises(KeyboardInterrupt):
        predict(["--model", str(model), "--input", str(data), "--output", str(output)])
    other_data = tmp_path / "other.txt"
    write_tweets(other_data, 4)
    monkeypatch.setattr(hvpnet_hf.predict, "pipeline", lambda *args, **kwargs: pytest.fail("the model ran"))
    for changed, argv in [
        ("dtype", ["--model", str(model), "--input", str(data), "--dtype", "bfloat16"]),
        ("input, input_file", ["--model", str(model), "--input", str(other_data)]),
        ("model, model_files, task", ["--model", tiny_re_dir, "--input", str(data)]),
    ]:
        with pytest.raises(ValueError, match=rf"--output {output} belongs to an unfinished run with other settings "
                                             rf"\({changed} differ, see {output}.run.json\)"):  # fmt: skip
            predict([*argv, "--output", str(output)])
    # Another model saved in the same folder is another run too: its files differ.
    weights = next(model.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    with pytest.raises(ValueError, match=r"\(model_files differ"):
        predict(["--model", str(model), "--input", str(data), "--output", str(output)])


def test_each_written_prediction_is_flushed_before_the_next_is_made(tiny_ner_dir, tmp_path, monkeypatch):
    data = tmp_path / "tweets.txt"
    write_tweets(data, 9)
    output = tmp_path / "out.txt"
    postprocess = MultimodalNerPipeline.postprocess
    unwritten = []

    def counting_postprocess(self, model_outputs, **parameters):
        partial = tmp_path / "out.txt.partial"
        written = partial.read_text(encoding="utf-8").count("\n\n") if partial.exists() else 0
        unwritten.append(len(unwritten) - written)  # predictions made so far but not on disk
        return postprocess(self, model_outputs, **parameters)

    monkeypatch.setattr(MultimodalNerPipeline, "postprocess", counting_postprocess)
    predict(["--model", tiny_ner_dir, "--input", str(data), "--output", str(output), "--batch_size", "4"])
    # The command holds no prediction: memory does not grow with the input.
    assert unwritten == [0] * 9
    assert len(read_conll(output)) == 9


def run_shard(argv: list[str], rank: int, world_size: int, monkeypatch) -> dict[str, float]:
    """`predict(argv)` as the process `rank` of `world_size` started by torchrun or accelerate launch."""
    with monkeypatch.context() as environment:
        environment.setenv("RANK", str(rank))
        environment.setenv("LOCAL_RANK", str(rank))
        environment.setenv("WORLD_SIZE", str(world_size))
        return predict(argv)


def test_processes_predict_their_shares_and_merge_them_in_input_order(tiny_ner_dir, tmp_path, monkeypatch):
    data = tmp_path / "tweets.txt"
    write_tweets(data, 7)
    common = ["--model", tiny_ner_dir, "--input", str(data)]
    one_process = predict([*common, "--output", str(tmp_path / "one.txt")])
    output = tmp_path / "out.txt"
    calls = stop_after(monkeypatch, MultimodalNerPipeline, 100)
    assert run_shard([*common, "--output", str(output)], 1, 3, monkeypatch) == {}
    assert len(calls) == 2 and len(read_conll(tmp_path / "out.txt.shard1-of-3")) == 2  # examples 1 and 4
    assert not output.exists()
    # A process that stopped while merging leaves its lock: the last process does not merge, --merge does.
    (tmp_path / "out.txt.merging").touch()
    for rank in (0, 2):
        assert run_shard([*common, "--output", str(output)], rank, 3, monkeypatch) == {}
    assert len(calls) == 7 and not output.exists()
    with pytest.raises(SystemExit):
        parse_arguments(["--merge", "--output", str(output), "--model", tiny_ner_dir])
    assert predict(["--merge", "--output", str(output)]) == one_process
    assert output.read_text() == (tmp_path / "one.txt").read_text()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["one.txt", "out.txt", "tweets.txt"]


def test_merge_names_the_shards_not_yet_whole(tiny_ner_dir, tmp_path, monkeypatch):
    data = tmp_path / "tweets.txt"
    write_tweets(data, 4)
    output = tmp_path / "out.txt"
    run_shard(["--model", tiny_ner_dir, "--input", str(data), "--output", str(output)], 0, 2, monkeypatch)
    with pytest.raises(FileNotFoundError, match=r"--merge: .*out.txt.shard1-of-2 not whole: rerun"):
        predict(["--merge", "--output", str(output)])
    with pytest.raises(FileNotFoundError, match="--merge: .* needs the shards of one run, found the settings of 0"):
        predict(["--merge", "--output", str(tmp_path / "other.txt")])


def test_two_processes_write_the_one_process_output(tiny_re_dir, tmp_path):
    mnre = f"{SAMPLE}/mnre"
    common = ["--model", tiny_re_dir, "--input", f"{mnre}/txt/mnre_test.txt", "--rel2id", f"{mnre}/mnre_rel2id.json",
              "--image_dir", f"{mnre}/img_org/test", "--top_k", "2"]  # fmt: skip
    predict([*common, "--output", str(tmp_path / "one.jsonl")])
    command = [sys.executable, "-m", "hvpnet_hf.predict", *common, "--output", str(tmp_path / "two.jsonl")]
    processes = [
        subprocess.Popen(
            command,
            env={**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    logs = [process.communicate(timeout=600) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], [stderr[-2000:] for _, stderr in logs]
    assert (tmp_path / "two.jsonl").read_text() == (tmp_path / "one.jsonl").read_text()
    # The process that finished last merged the shards; only it wrote the output (and would print its scores).
    assert sum("merged the 2 shards" in stderr for _, stderr in logs) == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == ["one.jsonl", "two.jsonl"]


@pytest.fixture
def recorded_runs(monkeypatch, tmp_path):
    """What the runs of `predict` in a test used: the dtype of each pipeline's model, and the id of the process
    that preprocessed each input (a DataLoader worker or this process), appended to a file as workers are processes."""
    dtypes = []
    readers = tmp_path / "readers.txt"

    def recording_pipeline(*args, **kwargs):
        runner = pipeline(*args, **kwargs)
        dtypes.append(runner.model.dtype)
        return runner

    monkeypatch.setattr("hvpnet_hf.predict.pipeline", recording_pipeline)
    for pipeline_class in (MultimodalNerPipeline, MultimodalRePipeline):

        def recording_preprocess(self, inputs, original=pipeline_class.preprocess, **parameters):
            with open(readers, "a", encoding="utf-8") as file:
                file.write(f"{os.getpid()}\n")
            return original(self, inputs, **parameters)

        monkeypatch.setattr(pipeline_class, "preprocess", recording_preprocess)
    return dtypes, readers


def test_workers_and_bfloat16_keep_one_sentence_per_example_in_order(tiny_ner_dir, tmp_path, recorded_runs):
    twitter = f"{SAMPLE}/twitter"
    common = [
        "--model", tiny_ner_dir,
        "--input", f"{twitter}/test.txt",
        "--image_dir", f"{twitter}/images",
        "--object_dir", f"{twitter}/aux_images/test/crops",
        "--object_map", f"{twitter}/twitter_test_dict.pth",
        "--batch_size", "3",
    ]  # fmt: skip
    runs = {"serial": [], "workers": ["--num_workers", "2"], "bf16": ["--num_workers", "2", "--dtype", "bfloat16"]}
    dtypes, readers_file = recorded_runs
    outputs, readers = {}, {}
    for name, options in runs.items():
        predict([*common, "--output", str(tmp_path / f"{name}.txt"), *options])
        outputs[name] = (tmp_path / f"{name}.txt").read_text(encoding="utf-8")
        readers[name] = readers_file.read_text().split()
        readers_file.unlink()
    assert dtypes == [torch.float32, torch.float32, torch.bfloat16]
    num_examples = len(load_mner_dataset(data_files={"test": f"{twitter}/test.txt"})["test"])
    # Every example is read once, in this process without workers, in the two worker processes with them.
    assert {name: len(pids) for name, pids in readers.items()} == dict.fromkeys(runs, num_examples)
    assert set(readers["serial"]) == {str(os.getpid())}
    assert len(set(readers["workers"])) == 2 and str(os.getpid()) not in readers["workers"]
    # The same float32 computation on the same inputs: the same file, so the outputs came back in input order.
    assert outputs["workers"] == outputs["serial"]
    # bfloat16 may tag a word of this random model otherwise (its emissions are close), not the words or gold tags.
    sentences = {name: read_conll(tmp_path / f"{name}.txt") for name in ("serial", "bf16")}
    assert [(words, gold) for words, gold, _ in sentences["bf16"]] == [
        (words, gold) for words, gold, _ in sentences["serial"]
    ]


def test_relation_workers_and_bfloat16_keep_one_record_per_line_in_order(tiny_re_dir, tmp_path, recorded_runs):
    mnre = f"{SAMPLE}/mnre"
    common = ["--model", tiny_re_dir, "--input", f"{mnre}/txt/mnre_test.txt", "--image_dir", f"{mnre}/img_org/test",
              "--rel2id", f"{mnre}/mnre_rel2id.json", "--batch_size", "4", "--num_workers", "2"]  # fmt: skip
    dtypes, readers_file = recorded_runs
    for dtype in ("float32", "bfloat16"):
        predict([*common, "--dtype", dtype, "--output", str(tmp_path / f"{dtype}.jsonl")])
    assert dtypes == [torch.float32, torch.bfloat16]
    assert str(os.getpid()) not in readers_file.read_text().split()
    examples = load_mre_dataset(data_files={"test": f"{mnre}/txt/mnre_test.txt"}, rel2id=f"{mnre}/mnre_rel2id.json")
    for dtype in ("float32", "bfloat16"):
        records = [json.loads(line) for line in (tmp_path / f"{dtype}.jsonl").read_text().splitlines()]
        assert [record["id"] for record in records] == examples["test"]["id"]
        assert all(record["predicted"] in RELATIONS for record in records)


@pytest.fixture
def no_model_run(monkeypatch):
    """Fails the test if the command loads a model to predict."""
    monkeypatch.setattr(hvpnet_hf.predict, "pipeline", lambda *args, **kwargs: pytest.fail("the model ran"))


def test_an_image_dir_without_the_inputs_images_is_an_error(tiny_ner_dir, tmp_path, no_model_run):
    empty = tmp_path / "images"
    empty.mkdir()
    output = tmp_path / "out.txt"
    with pytest.raises(
        FileNotFoundError, match=f"none of the 100 images of --input .* was found in --image_dir {empty}"
    ):
        predict(["--model", tiny_ner_dir, "--input", f"{SAMPLE}/twitter/test.txt", "--image_dir", str(empty),
                 "--output", str(output)])  # fmt: skip
    assert not output.exists()


@pytest.mark.parametrize(
    "output, error, message",
    [
        ("missing/out.txt", FileNotFoundError, "--output .*missing/out.txt: the folder .*missing does not exist"),
        ("", IsADirectoryError, "--output .* is a folder; name the file to write"),
    ],
)
def test_an_output_that_cannot_be_written_is_refused_first(tiny_ner_dir, tmp_path, output, error, message):
    with pytest.raises(error, match=message):
        predict(["--model", tiny_ner_dir, "--input", f"{SAMPLE}/twitter/test.txt", "--output", str(tmp_path / output)])
    assert list(tmp_path.iterdir()) == []


def test_relation_settings_the_model_cannot_use_are_refused(tiny_re_dir, tiny_ner_dir, tmp_path, no_model_run):
    arguments = ["--input", f"{SAMPLE}/mnre/txt/mnre_test.txt", "--output", str(tmp_path / "out.jsonl")]
    with pytest.raises(ValueError, match=f"--top_k must be at most 4, the relations of {tiny_re_dir}; got 5"):
        predict(["--model", tiny_re_dir, *arguments, "--top_k", "5"])
    with pytest.raises(ValueError, match=f"--top_k: settings of relation models, but {tiny_ner_dir} is an NER model"):
        predict(["--model", tiny_ner_dir, *arguments, "--top_k", "1"])
    with pytest.raises(ValueError, match="--top_k and --rel2id: settings of relation models"):
        predict(["--model", tiny_ner_dir, *arguments, "--top_k", "1", "--rel2id", f"{SAMPLE}/mnre/mnre_rel2id.json"])
    for flag, value in (("--batch_size", "0"), ("--num_workers", "-1"), ("--top_k", "0")):
        with pytest.raises(SystemExit):
            parse_arguments(["--model", tiny_re_dir, *arguments, flag, value])


def test_help_gives_the_whole_description(capsys):
    with pytest.raises(SystemExit):
        parse_arguments(["--help"])
    assert " ".join(hvpnet_hf.predict.__doc__.split()) in " ".join(capsys.readouterr().out.split())


# The columns of the data set that `write_own_input` writes.
OWN_COLUMNS = ["--text_column_name", "words", "--label_column_name", "tags", "--image_column_name", "picture"]


def write_own_input(folder) -> Path:
    """The bundled Twitter test split as a data set of a user's own, `folder/posts.jsonl`: its own column names
    (`OWN_COLUMNS`), image paths relative to the file."""
    twitter = f"{SAMPLE}/twitter"
    examples = load_mner_dataset(data_files={"test": f"{twitter}/test.txt"}, image_dir=f"{twitter}/images")["test"]
    names = examples.features["ner_tags"].feature.names
    shutil.copytree(f"{twitter}/images", folder / "pictures")
    rows = [
        {"words": row["tokens"], "tags": [names[tag] for tag in row["ner_tags"]],
         "picture": row["image"] and f"pictures/{row['image_id']}"}
        for row in examples
    ]  # fmt: skip
    own_input = folder / "posts.jsonl"
    own_input.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return own_input


def test_json_lines_input_predicts_as_the_same_release_file(tiny_ner_dir, tmp_path):
    twitter = f"{SAMPLE}/twitter"
    release = ["--model", tiny_ner_dir, "--input", f"{twitter}/test.txt", "--image_dir", f"{twitter}/images"]
    predict([*release, "--output", str(tmp_path / "release.txt")])
    own_input = write_own_input(tmp_path)
    own = ["--model", tiny_ner_dir, "--input", str(own_input), *OWN_COLUMNS, "--output", str(tmp_path / "own.txt")]
    scores = predict(own)
    assert (tmp_path / "own.txt").read_text() == (tmp_path / "release.txt").read_text()
    assert "f1" in scores
    with pytest.raises(ValueError, match="--image_dir: settings of the published formats"):
        predict([*own, "--image_dir", f"{twitter}/images"])


def test_a_table_input_is_read_as_it_is_predicted(tiny_ner_dir, tmp_path, monkeypatch):
    data = tmp_path / "posts.jsonl"
    rows = [{"tokens": ["Hello", f"@anna{index}"], "ner_tags": ["O", "B-PER"]} for index in range(20)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    rows_read, read_before_output = [], []
    normalize = data_sources._RowNormalizer.__call__

    def counting_normalize(self, row, index):
        rows_read.append(index)
        return normalize(self, row, index)

    def counting_postprocess(self, model_outputs, original=MultimodalNerPipeline.postprocess, **parameters):
        read_before_output.append(len(rows_read))
        return original(self, model_outputs, **parameters)

    monkeypatch.setattr(data_sources._RowNormalizer, "__call__", counting_normalize)
    monkeypatch.setattr(MultimodalNerPipeline, "postprocess", counting_postprocess)
    predict(
        ["--model", tiny_ner_dir, "--input", str(data), "--output", str(tmp_path / "out.txt"), "--batch_size", "2"]
    )
    # The first batch of 2 was predicted when at most one batch more had been read (the pipeline reads a batch
    # ahead), not after the whole input: memory does not grow with the input.
    assert read_before_output[0] <= 4
    assert rows_read == list(range(20)) and len(read_conll(tmp_path / "out.txt")) == 20


def test_a_table_input_keeps_input_order_with_workers_resumes_and_splits_over_processes(
    tiny_ner_dir, tmp_path, monkeypatch
):
    common = ["--model", tiny_ner_dir, "--input", str(write_own_input(tmp_path)), *OWN_COLUMNS, "--batch_size", "3"]
    predict([*common, "--output", str(tmp_path / "serial.txt")])
    expected = (tmp_path / "serial.txt").read_text()
    # Worker w of 2 decodes the rows k with k % 2 == w; the DataLoader gives them back in input order.
    predict([*common, "--num_workers", "2", "--output", str(tmp_path / "workers.txt")])
    assert (tmp_path / "workers.txt").read_text() == expected
    # A stopped run resumes without decoding the images of the examples already written.
    output = tmp_path / "resumed.txt"
    stop_after(monkeypatch, MultimodalNerPipeline, 5)
    with pytest.raises(KeyboardInterrupt):
        predict([*common, "--output", str(output)])
    decoded = []

    def recording_decode(image, *args):
        decoded.append(getattr(image, "filename", image))
        return decode_image(image, *args)

    monkeypatch.setattr("hvpnet_hf.predict.decode_image", recording_decode)
    predict([*common, "--output", str(output)])
    assert output.read_text() == expected
    pictures = [json.loads(line)["picture"] for line in (tmp_path / "posts.jsonl").read_text().splitlines()]
    written_first = {str(tmp_path / picture) for picture in pictures[:5] if picture}
    assert decoded and not written_first & set(map(str, decoded))
    # Two processes, each predicting its share of the stream, merge into the one-process output.
    for rank in (0, 1):
        run_shard([*common, "--num_workers", "2", "--output", str(tmp_path / "two.txt")], rank, 2, monkeypatch)
    assert (tmp_path / "two.txt").read_text() == expected


GMNER = f"{SAMPLE}/gmner"
# The bundled grounding set's test tweets with their gold boxes, images and candidates (crops and their boxes).
GMNER_INPUT = [
    "--input", f"{GMNER}/txt/test.txt",
    "--xml_dir", f"{GMNER}/xml",
    "--image_dir", f"{GMNER}/images",
    "--object_dir", f"{GMNER}/objects",
    "--object_map", f"{GMNER}/objects/objects_test_dict.pth",
]  # fmt: skip


def test_grounded_predictions_give_each_entity_its_box_or_none(tiny_gmner_dir, tmp_path, capsys):
    output = tmp_path / "test.jsonl"
    scores = predict(["--model", tiny_gmner_dir, *GMNER_INPUT, "--output", str(output), "--batch_size", "8"])
    sources = {key: value for key, value in sample_sources("gmner").items() if key != "data_dir"}
    examples = load_gmner_dataset(data_files={"test": f"{GMNER}/txt/test.txt"}, num_candidates=2, **sources)["test"]
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [record["id"] for record in records] == examples["id"]
    grounder = pipeline("multimodal-gmner", model=tiny_gmner_dir)
    boxes_written = 0
    for record, example in zip(records, examples, strict=True):
        assert record["tokens"] == example["tokens"] and record["gold"] == example["entities"]
        # The pipeline's entities for the same tweet and candidates, in the example's words.
        expected = grounder(
            {"words": example["tokens"], "image": example["image"], "objects": example["objects"],
             "boxes": example["candidate_boxes"]}
        )  # fmt: skip
        assert [(entity["start"], entity["end"], entity["type"], entity["box"]) for entity in record["entities"]] == [
            (entity["word_start"], entity["word_end"], entity["entity_group"], entity["box"]) for entity in expected
        ]
        for entity, found in zip(record["entities"], expected, strict=True):
            assert entity["text"] == " ".join(example["tokens"][entity["start"] : entity["end"]])
            assert entity["region_score"] == round(found["region_score"], 4)
            assert entity["box"] is None or entity["box"] in example["candidate_boxes"]
            boxes_written += entity["box"] is not None
    assert boxes_written, "some entities are grounded in a candidate, so boxes are written"
    # The printed scores are the GMNER / MNER / EEG scores of the written file against its gold entities.
    rescored = evaluate.load(metric_path("gmner_f1")).compute(
        predictions=[[{key: entity[key] for key in ("start", "end", "type", "box")} for entity in record["entities"]]
                     for record in records],
        references=[[{key: entity[key] for key in ("start", "end", "type", "boxes")} for entity in record["gold"]]
                    for record in records],
    )  # fmt: skip
    assert scores == rescored and scores["num_gold"] == sum(len(found) for found in examples["entities"])
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["gmner_f1"] == round(scores["gmner_f1"], 4)


def test_grounded_runs_resume_and_split_over_processes(tiny_gmner_dir, tmp_path, monkeypatch):
    common = ["--model", tiny_gmner_dir, *GMNER_INPUT, "--batch_size", "4"]
    one_process = predict([*common, "--output", str(tmp_path / "one.jsonl")])
    output = tmp_path / "out.jsonl"
    calls = stop_after(monkeypatch, MultimodalGroundedNerPipeline, 10)
    with pytest.raises(KeyboardInterrupt):
        predict([*common, "--output", str(output)])
    assert len((tmp_path / "out.jsonl.partial").read_text().splitlines()) == 10
    calls.clear()
    assert predict([*common, "--output", str(output)]) == one_process
    assert len(calls) == 50 and output.read_text() == (tmp_path / "one.jsonl").read_text()  # 60 test tweets
    shards = tmp_path / "shards.jsonl"
    for rank in range(2):
        run_shard([*common, "--output", str(shards)], rank, 2, monkeypatch)
    assert shards.read_text() == (tmp_path / "one.jsonl").read_text()


def test_grounding_settings_are_checked_before_the_model_runs(tiny_gmner_dir, tiny_ner_dir, tmp_path, no_model_run):
    output = ["--output", str(tmp_path / "out.jsonl")]
    without_xml = [argument for argument in GMNER_INPUT if argument not in ("--xml_dir", f"{GMNER}/xml")]
    with pytest.raises(ValueError, match=f"--xml_dir: {tiny_gmner_dir} is a grounding model, which reads the gold"):
        predict(["--model", tiny_gmner_dir, *without_xml, *output])
    with pytest.raises(ValueError, match=f"--xml_dir: settings of grounding models, but {tiny_ner_dir} is not one"):
        predict(["--model", tiny_ner_dir, *GMNER_INPUT, *output])
    with pytest.raises(ValueError, match=f"--top_k: settings of relation models, but {tiny_gmner_dir} is a grounding"):
        predict(["--model", tiny_gmner_dir, *GMNER_INPUT, *output, "--top_k", "1"])
    # Crops whose boxes file is not next to their crop map cannot be grounded.
    crop_map = tmp_path / "objects_test_dict.pth"
    shutil.copy(f"{GMNER}/objects/objects_test_dict.pth", crop_map)
    with pytest.raises(FileNotFoundError, match=r"a grounding model needs each crop's box, .*objects_test_boxes.json"):
        predict(["--model", tiny_gmner_dir, *GMNER_INPUT, "--object_map", str(crop_map), *output])
    assert not (tmp_path / "out.jsonl").exists()
