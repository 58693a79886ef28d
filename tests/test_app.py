"""The web app: what it shows for an input (against the pipelines), bad input, and the page in headless Chromium."""

import json
import re
import shutil
import socket
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_image_processing_hvpnet import resize_pixels
from transformers import BertConfig, pipeline

from hvpnet_hf import app
from hvpnet_hf.analysis import gates
from hvpnet_hf.app import (
    BOX_COLOR,
    NUM_SAMPLE_TWEETS,
    HVPNetApp,
    InputError,
    entity_changes,
    example_gates,
    find_span,
    launch,
    load_pipeline,
    relation_change,
    sample_tweets,
)
from hvpnet_hf.image_processing_hvpnet import MAX_RESIZE_SQUARES
from hvpnet_hf.loading import NO_RELATION, load_mner_dataset, load_mre_dataset
from hvpnet_hf.object_detection import DetectedObject, text_queries
from hvpnet_hf.sample_data import sample_sources
from hvpnet_hf.tasks import GMNER, NER, RE

CHROMIUM = "/usr/bin/chromium"
# The flags that keep a headless Chromium from reaching out (updates, sync, field trials) and from needing a GPU.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# A sample tweet with two crops (the tiny models' slots) and the first RE sample tweet.
NER_TWEET = next(tweet for tweet in sample_tweets(NER) if len(tweet.objects) == 2)
RE_TWEET = sample_tweets(RE)[0]


def sample_paths(tweet):
    return tweet.image, list(tweet.objects)


def entity_pairs(text: str, entities) -> list[tuple[str, str]]:
    """(text of the span, type) of pipeline entities, the form the page shows them in."""
    return [(text[entity["start"] : entity["end"]], entity["entity_group"]) for entity in entities]


def spans_of(highlighted: dict) -> list[tuple[str, str]]:
    return [(highlighted["text"][span["start"] : span["end"]], span["entity"]) for span in highlighted["entities"]]


def png_header(width: int, height: int) -> bytes:
    """A PNG file that declares `width` x `height` pixels and holds none: PIL sizes it before decoding anything."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def ner_app(tiny_ner_dir):
    return HVPNetApp(tiny_ner_dir)


@pytest.fixture(scope="module")
def re_app(tiny_re_dir):
    return HVPNetApp(tiny_re_dir)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_files")
    (folder / "notes.txt").write_text("not a picture\n")
    # 20000 x 20000 = 400 million pixels, over twice PIL's MAX_IMAGE_PIXELS (about 89 million): a decompression bomb.
    (folder / "bomb.png").write_bytes(png_header(20000, 20000))
    not_hvpnet = folder / "bert"
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37).save_pretrained(
        not_hvpnet
    )
    return folder


def test_sample_tweets_are_the_first_test_tweets_of_the_sample_sets_with_something_to_find():
    """The page's samples are read from the bundled data, whatever seed built it: the first test tweets with an
    image, a crop and an entity (NER) or a relation (RE)."""
    ner_test = load_mner_dataset(**sample_sources("ner"))["test"]
    expected = [
        (" ".join(tweet["tokens"]), tweet["image"], tuple(tweet["objects"]), "", "")
        for tweet in ner_test
        if tweet["image"] and tweet["objects"] and any(tweet["ner_tags"])
    ]
    re_test = load_mre_dataset(**sample_sources("re"))["test"]
    no_relation = re_test.features["relation"].str2int(NO_RELATION)
    expected_re = [
        (
            " ".join(tweet["tokens"]),
            tweet["image"],
            tuple(tweet["objects"]),
            tweet["head"]["name"],
            tweet["tail"]["name"],
        )
        for tweet in re_test
        if tweet["image"] and tweet["objects"] and tweet["relation"] != no_relation
    ]
    for task, tweets in ((NER, expected), (RE, expected_re)):
        shown = [(tweet.text, tweet.image, tweet.objects, tweet.head, tweet.tail) for tweet in sample_tweets(task)]
        assert shown == tweets[:NUM_SAMPLE_TWEETS] and len(shown) == NUM_SAMPLE_TWEETS
        assert all(Path(path).is_file() for tweet in sample_tweets(task) for path in (tweet.image, *tweet.objects))


def test_ner_shows_the_pipelines_entities_with_and_without_the_image(ner_app, tiny_ner_dir):
    image, crops = sample_paths(NER_TWEET)
    shown = ner_app.predict(NER_TWEET.text, image, crops)
    tagger = pipeline("multimodal-ner", model=tiny_ner_dir)
    expected = entity_pairs(NER_TWEET.text, tagger({"text": NER_TWEET.text, "image": image, "objects": crops}))
    assert expected, "the tiny model finds entities in this tweet, so the comparison is not empty"
    assert spans_of(shown["spans"]) == expected
    assert spans_of(shown["spans_masked"]) == entity_pairs(NER_TWEET.text, tagger(NER_TWEET.text))
    # The 64 x 64 sample picture is shown 4 times larger (DISPLAY_SIZE 256), pixel for pixel.
    assert len(shown["crops"]) == 2 and shown["image"].size == (256, 256)
    assert (
        shown["image"].resize((64, 64), Image.Resampling.NEAREST).tobytes()
        == Image.open(image).convert("RGB").tobytes()
    )
    assert "2 crop(s)" in shown["status"]
    assert np.asarray(shown["gates"]).std() > 0  # a drawn heat map, not an empty canvas


def test_re_shows_the_marked_pair_and_the_pipelines_relation_scores(re_app, tiny_re_dir):
    image, crops = sample_paths(RE_TWEET)
    shown = re_app.predict(RE_TWEET.text, image, crops, head=RE_TWEET.head, tail=RE_TWEET.tail)
    assert spans_of(shown["spans"]) == [(RE_TWEET.head, "head"), (RE_TWEET.tail, "tail")]
    classifier = pipeline("multimodal-re", model=tiny_re_dir)
    words = RE_TWEET.text.split()
    pair = {"head": find_span(words, RE_TWEET.head, "head"), "tail": find_span(words, RE_TWEET.tail, "tail")}
    ranked = classifier({"words": words, **pair, "image": image, "objects": crops}, top_k=4)
    assert shown["relations"] == pytest.approx({entry["relation"]: entry["score"] for entry in ranked})
    masked = classifier({"words": words, **pair}, top_k=4)
    assert shown["relations_masked"] == pytest.approx({entry["relation"]: entry["score"] for entry in masked})
    assert shown["changes"] == relation_change(ranked[0], masked[0])


def test_gates_of_one_example_are_per_layer_distributions_over_present_images(ner_app):
    image, crops = sample_paths(NER_TWEET)
    model = ner_app.classifier.model
    layers, stages = model.config.text_config.num_hidden_layers, model.base_model.visual_encoder.num_stages
    gates = example_gates(ner_app.classifier, {"text": NER_TWEET.text, "image": image, "objects": crops[:1]})
    assert [gates[group]["images"] for group in ("global image", "object crops")] == [1, 1]
    for entry in gates.values():
        weights = torch.tensor(entry["mean"])  # (L, c): one softmax over the stages per text layer
        assert weights.shape == (layers, stages)
        # A softmax sums to 1; float32 rounding over 4 stages stays far below 1e-5.
        torch.testing.assert_close(weights.sum(dim=-1), torch.ones(len(weights)), atol=1e-5, rtol=0)
    assert example_gates(ner_app.classifier, {"text": NER_TWEET.text}) is None  # no image, no gate
    assert ner_app.predict(NER_TWEET.text, None, None)["gates"] is None


def test_gates_heat_map_is_drawn_in_memory_as_the_analysis_saves_it(monkeypatch, tmp_path):
    means = {
        "global image": {"mean": [[0.1, 0.9], [0.6, 0.4]], "images": 1},
        "object crops": {"mean": [[0.5, 0.5], [0.2, 0.8]], "images": 2},
    }
    gates.plot(means, tmp_path / "gates.png")

    def no_temporary_folder(*args, **kwargs):
        raise AssertionError("the heat map went through a temporary folder")

    monkeypatch.setattr(tempfile, "mkdtemp", no_temporary_folder)
    drawn = app.gates_figure(means)
    with Image.open(tmp_path / "gates.png") as saved:
        assert np.array_equal(np.asarray(drawn), np.asarray(saved.convert("RGB")))  # the same pixels, same size


def test_detected_crops_are_cut_from_their_boxes_and_drawn(ner_app, monkeypatch):
    image_path, _ = sample_paths(NER_TWEET)
    boxes = [(2, 3, 30, 40), (20, 10, 60, 50)]
    asked = []

    class FakeCropper:  # stands in for an ObjectCropper: what the app asks of it is `detect`
        def detect(self, image, queries):
            asked.append(queries)
            return [DetectedObject(0.9, box, "thing") for box in boxes]

    monkeypatch.setattr(ner_app, "cropper", FakeCropper())
    shown = ner_app.predict(NER_TWEET.text, image_path, None, detect=True)
    assert [crop.size for crop in shown["crops"]] == [(28, 37), (40, 40)]
    assert asked[0] == text_queries(NER_TWEET.text.split(), [])  # the text's capitalized runs are detector queries
    red = tuple(int(BOX_COLOR[i : i + 2], 16) for i in (1, 3, 5))
    assert shown["image"].getpixel((4 * 2, 4 * 20)) == red  # on the left edge of the first box, shown 4 times larger
    given = ner_app.predict(NER_TWEET.text, image_path, sample_paths(NER_TWEET)[1], detect=True)
    assert len(asked) == 1 and len(given["crops"]) == 2  # crops given: nothing detected
    too_many = ner_app.predict(NER_TWEET.text, image_path, [image_path] * 3)
    assert (
        len(too_many["crops"]) == 2 and "1 more crop(s) given than the model's 2 slots: not used" in too_many["status"]
    )


def test_bad_inputs_get_a_message_naming_the_problem(ner_app, re_app, bad_files):
    image, _ = sample_paths(NER_TWEET)
    assert ner_app.predict("   ", image, None) == {"status": "**Enter a text: it is empty.**"}
    shown = ner_app.predict(NER_TWEET.text, str(bad_files / "notes.txt"), None)
    assert list(shown) == ["status"] and "`notes.txt` was not used: it is not an image" in shown["status"]
    shown = ner_app.predict(NER_TWEET.text, image, [str(bad_files / "bomb.png")])
    assert "crop `bomb.png` was not used: it is too large to decode" in shown["status"]
    shown = re_app.predict(RE_TWEET.text, image, None, head=RE_TWEET.head, tail="Beyonce")
    assert "tail entity `Beyonce` is not in the text" in shown["status"]
    assert "Enter the head entity" in re_app.predict(RE_TWEET.text, image, None, tail=RE_TWEET.tail)["status"]
    for folder in (bad_files / "bert", bad_files):  # another model's folder; a folder without a model
        app = HVPNetApp(str(folder))
        assert app.classifier is None and f"`{folder}` is not an HVPNeT" in app.load_error
        assert app.predict(NER_TWEET.text, image, None) == {"status": f"**{app.load_error}**"}
    # The app still answers after all of them.
    assert ner_app.predict(NER_TWEET.text, image, None)["spans"]["text"] == NER_TWEET.text


def test_a_strip_upload_is_read_in_bounded_memory(ner_app, tmp_path, monkeypatch):
    # A 40000 x 1 PNG of a few hundred bytes: timm's transform alone would resize it to 10 million x 256 pixels.
    # Every resize is checked before PIL runs it (see test_image_processing_hvpnet.py), so nothing large is allocated.
    size = ner_app.classifier.processor.image_processor.image_size
    resize = Image.Image.resize

    def checked_resize(image, new_size, resample=None, box=None, reducing_gap=None):
        extra = resize_pixels(image, new_size, box) - image.width * image.height
        assert extra <= (MAX_RESIZE_SQUARES + 1) * size**2, (image.size, new_size, box)
        return resize(image, new_size, resample, box, reducing_gap)

    monkeypatch.setattr(Image.Image, "resize", checked_resize)
    for shape in ((1, 40000, 3), (40000, 1, 3)):
        path = tmp_path / f"strip_{shape[0]}.png"
        Image.fromarray(np.full(shape, 200, np.uint8)).save(path)
        shown = ner_app.predict(NER_TWEET.text, str(path), [str(path)])
        assert shown["status"].startswith("Prediction of") and shown["spans"]["text"] == NER_TWEET.text


def test_changes_list_entities_found_only_with_or_without_the_image():
    paris = {"start": 0, "end": 5, "word": "Paris", "score": 0.9}
    with_image = [{**paris, "entity_group": "PER"}]
    masked = [{**paris, "entity_group": "LOC", "score": 0.6}]
    table = entity_changes(with_image, masked)
    assert table.startswith("The image changed 2 entities.")
    assert "| Paris | LOC | not found | 0.600 |" in table and "| Paris | PER | 0.900 | not found |" in table
    assert entity_changes(with_image, with_image).startswith("The image changed no entity")
    assert entity_changes([], []) == "No entity found, with the image or without it."
    changed = relation_change({"relation": "/per/per/couple", "score": 0.7}, {"relation": "None", "score": 0.5})
    assert (
        changed == "The image changed the relation: `/per/per/couple` (0.700) with it, `None` (0.500) with it masked."
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# How long the page may take to answer: a prediction on 2 CPU cores that other processes share can take tens of
# seconds; a page that never answers still fails.
PAGE_TIMEOUT_MS = 120_000


def file_name(name: str) -> re.Pattern:
    """A file name as gradio's file box shows it: the stem and the extension in elements of their own, which the
    page's text may separate by white space."""
    stem, suffix = Path(name).stem, Path(name).suffix
    return re.compile(re.escape(stem) + r"\s*" + re.escape(suffix))


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is absent (Debian's chromium package; .ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def served(browser, tmp_path):
    """Serves apps on free localhost ports and opens them in fresh browser contexts (fresh profiles); records every
    request the pages make to anywhere else."""
    pages, outside = [], []

    def serve(app: HVPNetApp):
        page_app = launch(app, port=free_port(), block=False)
        pages.append(page_app)
        tab = browser.new_context(viewport={"width": 1280, "height": 1100}).new_page()
        tab.set_default_timeout(PAGE_TIMEOUT_MS)
        tab.on("request", lambda request: outside.append(request.url) if not is_local(request.url) else None)
        tab.goto(page_app.local_url)
        return tab

    yield serve, outside
    for page_app in pages:
        page_app.close()


def is_local(url: str) -> bool:
    return url.startswith(("http://127.0.0.1", "data:", "blob:"))


def page_entities(tab, selector: str) -> list[tuple[str, str]]:
    """(text, label) of the highlighted spans of a `HighlightedText` on the page."""
    return tab.eval_on_selector_all(
        f"{selector} .token.highlighted",
        "tokens => tokens.map(token => [token.querySelector('.text').innerText.trim(),"
        " token.querySelector('.label').innerText.trim()])",
    )


def test_page_in_a_browser_shows_the_pipelines_entities(served, ner_app, tiny_ner_dir, bad_files, tmp_path):
    from playwright.sync_api import expect

    serve, outside = served
    tab = serve(ner_app)
    status = tab.locator("#status")
    tab.locator("#predict").click()
    expect(status).to_contain_text("Enter a text: it is empty.", timeout=PAGE_TIMEOUT_MS)

    image, _ = sample_paths(NER_TWEET)
    tab.locator("#text textarea").fill(NER_TWEET.text)
    tab.locator("#image input[type=file]").set_input_files(image)
    expect(tab.locator("#image")).to_contain_text(file_name(Path(image).name), timeout=PAGE_TIMEOUT_MS)
    tab.locator("#predict").click()
    expect(status).to_contain_text("Prediction of", timeout=PAGE_TIMEOUT_MS)
    tagger = pipeline("multimodal-ner", model=tiny_ner_dir)
    expected = entity_pairs(NER_TWEET.text, tagger({"text": NER_TWEET.text, "image": image}))
    assert expected and page_entities(tab, "#spans") == [list(pair) for pair in expected]
    assert page_entities(tab, "#spans-masked") == [
        list(pair) for pair in entity_pairs(NER_TWEET.text, tagger(NER_TWEET.text))
    ]
    expect(tab.locator("#gates img")).to_be_visible()

    screenshot = tmp_path / "app.png"
    tab.screenshot(path=screenshot, full_page=True)
    pixels = np.asarray(Image.open(screenshot).convert("L"), dtype=np.float64)
    # A blank or single-color page has a variance near 0; text, highlights and images give far more than 100.
    assert pixels.var() > 100

    # A crop that is not an image: a message in the page, then the page still predicts once it is removed.
    tab.locator("#objects input[type=file]").set_input_files(str(bad_files / "notes.txt"))
    expect(tab.locator("#objects")).to_contain_text(file_name("notes.txt"), timeout=PAGE_TIMEOUT_MS)
    tab.locator("#predict").click()
    expect(status).to_contain_text("The crop notes.txt was not used", timeout=PAGE_TIMEOUT_MS)
    tab.locator("#objects button[aria-label='Clear']").click()
    tab.locator("#predict").click()
    expect(status).to_contain_text("Prediction of", timeout=PAGE_TIMEOUT_MS)

    # A folder that is not an HVPNeT model: its page says so.
    bad_tab = serve(HVPNetApp(str(bad_files / "bert")))
    expect(bad_tab.locator("#load-error")).to_contain_text(
        "is not an HVPNeT NER, RE or grounded NER model", timeout=PAGE_TIMEOUT_MS
    )
    assert outside == []


def test_help_gives_the_whole_description(capsys):
    with pytest.raises(SystemExit):
        app.main(["--help"])
    assert " ".join(app.__doc__.split()) in " ".join(capsys.readouterr().out.split())


def test_a_model_whose_config_holds_a_refused_setting_is_named(tiny_ner_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_ner_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "prefix_grid": 0}))
    with pytest.raises(
        InputError, match=rf"(?s)`{re.escape(str(folder))}` could not be loaded.*prefix_grid must be >= 1"
    ):
        load_pipeline(str(folder))


@pytest.fixture(scope="module")
def grounding_tweet(tmp_path_factory):
    """The toy tweet of the tiny grounding model (`tiny_gmner_dir`): a 64 x 48 picture, the red and the blue crop
    as files, and their boxes as the page takes them."""
    folder = tmp_path_factory.mktemp("grounding_tweet")
    Image.new("RGB", (64, 48), (30, 160, 60)).save(folder / "tweet.png")
    crops = []
    for name, color in (("red", (250, 10, 10)), ("blue", (10, 10, 250))):
        Image.new("RGB", (20, 20), color).save(folder / f"{name}.png")
        crops.append(str(folder / f"{name}.png"))
    return "Alice met Bob in Paris", str(folder / "tweet.png"), crops, [[4, 2, 30, 40], [33, 10, 60, 47]]


def test_grounding_draws_each_entitys_region_labeled_on_the_picture(tiny_gmner_dir, grounding_tweet):
    text, image, crops, boxes = grounding_tweet
    grounding_app = HVPNetApp(tiny_gmner_dir)
    assert grounding_app.task is GMNER and "region of the image" in app.page_header(grounding_app)
    shown = grounding_app.predict(text, image, crops, boxes="4 2 30 40\n33, 10, 60, 47")
    grounder = pipeline("multimodal-gmner", model=tiny_gmner_dir)
    expected = grounder({"text": text, "image": image, "objects": crops, "boxes": boxes})
    grounded = [(entity["word"], entity["entity_group"], entity["box"]) for entity in expected if entity["box"]]
    assert grounded == [("Alice", "PER", boxes[0]), ("Bob", "PER", boxes[1])], "the toy model grounds these two"
    assert spans_of(shown["spans"]) == entity_pairs(text, expected)
    # The picture, shown 4 times larger (DISPLAY_SIZE 256), with the two regions outlined and labeled.
    red = tuple(int(BOX_COLOR[i : i + 2], 16) for i in (1, 3, 5))
    assert shown["image"].size == (256, 192)
    assert shown["image"].getpixel((4 * 4, 4 * 20)) == red  # the left edge of Alice's box
    assert shown["image"].getpixel((4 * 33, 4 * 30)) == red  # the left edge of Bob's box
    assert shown["image"].getpixel((4 * 2, 4 * 45)) == (30, 160, 60)  # outside both boxes
    picture = Image.open(image).convert("RGB")
    labeled = app.draw_boxes(picture, [boxes[0], boxes[1]], ["Alice (PER)", "Bob (PER)"])
    numbered = app.draw_boxes(picture, [boxes[0], boxes[1]])
    assert shown["image"].tobytes() == labeled.tobytes() != numbered.tobytes()  # the labels' text is drawn
    # The table names each entity, its region in the image's pixels (or none) and the region's score.
    assert (
        "| Alice | PER | 4, 2, 30, 40 |" in shown["regions"] and "| Bob | PER | 33, 10, 60, 47 |" in shown["regions"]
    )
    assert all(entity["box"] or f"| {entity['word']} | {entity['entity_group']} | none" in shown["regions"]
               for entity in expected)  # fmt: skip
    # With the image masked: the entities only, none of them grounded.
    assert spans_of(shown["spans_masked"]) == entity_pairs(text, grounder(text))
    assert all(entity["box"] is None for entity in grounder(text))
    # Boxes alone: the crops are cut from the picture at them.
    cut = grounding_app.predict(text, image, None, boxes="4 2 30 40\n33 10 60 47")
    assert [crop.size for crop in cut["crops"]] == [(26, 38), (27, 37)] and "2 crop(s)" in cut["status"]


def test_grounding_takes_the_detectors_crops_with_their_boxes(tiny_gmner_dir, grounding_tweet, monkeypatch):
    text, image, _, boxes = grounding_tweet
    grounding_app = HVPNetApp(tiny_gmner_dir)

    class FakeCropper:  # stands in for an ObjectCropper
        def detect(self, picture, queries):
            return [DetectedObject(0.9, tuple(box), "thing") for box in boxes]

    monkeypatch.setattr(grounding_app, "cropper", FakeCropper())
    shown = grounding_app.predict(text, image, None, detect=True)
    typed = grounding_app.predict(text, image, None, boxes="4 2 30 40\n33 10 60 47")
    assert shown["regions"] == typed["regions"] and shown["image"].tobytes() == typed["image"].tobytes()


def test_grounding_candidates_that_cannot_be_read_get_a_message(tiny_gmner_dir, grounding_tweet):
    text, image, crops, _ = grounding_tweet
    grounding_app = HVPNetApp(tiny_gmner_dir)
    assert "give one candidate box per crop" in grounding_app.predict(text, image, crops)["status"]
    assert "2 crop(s) but 1 candidate box(es)" in grounding_app.predict(text, image, crops, boxes="1 1 9 9")["status"]
    shown = grounding_app.predict(text, image, None, boxes="1 1 9 9\n5 5 5 9")
    assert "Candidate box line 2 `5 5 5 9` is not a box" in shown["status"]
    assert "give the image" in grounding_app.predict(text, None, None, boxes="1 1 9 9")["status"]
