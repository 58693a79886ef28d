"""`hvpnet-predict` over files in the published formats: one output entry per input example, in order."""

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys

import evaluate
import pytest
import torch
from modeling_utils import RELATIONS
from transformers import pipeline

import hvpnet_hf
from hvpnet_hf import load_mner_dataset, load_mre_dataset
from hvpnet_hf.metrics import metric_path
from hvpnet_hf.pipelines import MultimodalNerPipeline, MultimodalRePipeline
from hvpnet_hf.predict import parse_arguments, predict
from hvpnet_hf.prediction_files import read_conll

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


def test_a_failed_run_leaves_no_output_file(tiny_ner_dir, tmp_path, monkeypatch):
    from hvpnet_hf.pipelines import MultimodalNerPipeline

    data = tmp_path / "tweets.txt"
    data.write_text("IMGID:1\nHello\tO\n\nIMGID:2\nBye\tO\n\n", encoding="utf-8")
    postprocess = MultimodalNerPipeline.postprocess
    calls = []

    def failing_postprocess(self, model_outputs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        return postprocess(self, model_outputs)

    monkeypatch.setattr(MultimodalNerPipeline, "postprocess", failing_postprocess)
    output = tmp_path / "out.txt"
    with pytest.raises(RuntimeError, match="interrupted"):
        predict(["--model", tiny_ner_dir, "--input", str(data), "--output", str(output), "--batch_size", "1"])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tweets.txt"]
    # An earlier result is kept rather than replaced by a partial one.
    output.write_text("earlier\n")
    calls.clear()
    with pytest.raises(RuntimeError, match="interrupted"):
        predict(["--model", tiny_ner_dir, "--input", str(data), "--output", str(output)])
    assert output.read_text() == "earlier\n"


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


def test_json_lines_input_predicts_as_the_same_release_file(tiny_ner_dir, tmp_path):
    twitter = f"{SAMPLE}/twitter"
    release = ["--model", tiny_ner_dir, "--input", f"{twitter}/test.txt", "--image_dir", f"{twitter}/images"]
    predict([*release, "--output", str(tmp_path / "release.txt")])
    # The same examples as a data set of a user's own: its own column names, image paths relative to the file.
    examples = load_mner_dataset(data_files={"test": f"{twitter}/test.txt"}, image_dir=f"{twitter}/images")["test"]
    names = examples.features["ner_tags"].feature.names
    shutil.copytree(f"{twitter}/images", tmp_path / "pictures")
    rows = [
        {"words": row["tokens"], "tags": [names[tag] for tag in row["ner_tags"]],
         "picture": row["image"] and f"pictures/{row['image_id']}"}
        for row in examples
    ]  # fmt: skip
    own_input = tmp_path / "posts.jsonl"
    own_input.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    columns = ["--text_column_name", "words", "--label_column_name", "tags", "--image_column_name", "picture"]
    own = ["--model", tiny_ner_dir, "--input", str(own_input), *columns, "--output", str(tmp_path / "own.txt")]
    scores = predict(own)
    assert (tmp_path / "own.txt").read_text() == (tmp_path / "release.txt").read_text()
    assert "f1" in scores
    with pytest.raises(ValueError, match="--image_dir: settings of the published formats"):
        predict([*own, "--image_dir", f"{twitter}/images"])
