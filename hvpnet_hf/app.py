"""
A web page to try a trained HVPNeT model on a tweet and its image (the optional `app` extra: gradio, matplotlib):

    python -m hvpnet_hf.app --model outputs/demo/image_aware [--port 7860] [--detector FOLDER_OR_HUB_ID]

The model (a folder or Hub id) is a NER, a RE or a grounded NER model, told apart by its config. The page takes a
text (for RE also the head and tail entities, as they are written in the text) and an image, an upload or one of the
bundled sample tweets, and optionally object crops: uploaded, or found by the `--detector` model (see
`object_detection.py`). A grounded NER model chooses each entity's region among candidates: the uploaded crops with
their boxes (one `xmin ymin xmax ymax` line per crop, in the image's pixels), the boxes alone (the crops are cut from
the image), or the detected crops with theirs. It shows

- the text with the entities highlighted by type (RE: the head and tail, and the relations with their scores);
- the image with the crops the model read (their boxes drawn when they were detected); for grounded NER, with each
  entity's region drawn and labeled with the entity and its type, and a table of the regions and their scores;
- the gate weights of this example, text layer by backbone stage (the paper's Figure 4 for one input);
- the same prediction with the image and crops masked, and what the image changed (for grounded NER: the entities
  only, since without the image no entity has a region).

Predictions come from the package's pipelines (`pipelines.py`); the gate weights from the model run on the inputs the
pipeline prepared. An empty text, a file that is not an image, an image too large to decode (a PIL decompression
bomb) and a model that is not an HVPNeT model each get a message in the page, and the server goes on serving.
The page loads nothing from outside the machine: gradio's analytics are off and the theme uses the system's fonts.
"""

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from huggingface_hub.errors import StrictDataclassError
from PIL import Image, ImageDraw
from transformers import Pipeline

from .analysis.gates import figure as gates_heat_maps
from .analysis.gates import slot_presence
from .analysis.plotting import pyplot
from .grounding_data import load_gmner_dataset
from .image_processing_hvpnet import load_image
from .loading import NO_RELATION, load_mner_dataset, load_mre_dataset
from .object_detection import ObjectCropper, text_queries
from .pipelines import PIPELINE_FOR_TASK, split_words
from .sample_data import SAMPLE_DIR, sample_sources
from .tasks import GMNER, NER, RE, Task, task_of

# How many tweets of its sample set the page offers.
NUM_SAMPLE_TWEETS = 3
# Colors of the highlighted spans: NER entity types, and the RE head and tail.
SPAN_COLORS = {
    "PER": "#f4a261",
    "LOC": "#2a9d8f",
    "ORG": "#8ab6f9",
    "MISC": "#e9c46a",
    "head": "#f4a261",
    "tail": "#8ab6f9",
}
BOX_COLOR = "#e63946"
# Images shown smaller than this (pixels, longer side) are enlarged for display.
DISPLAY_SIZE = 256
# System fonts, so the page asks no font server for its default web fonts.
FONTS = ("ui-sans-serif", "system-ui", "sans-serif")
MONO_FONTS = ("ui-monospace", "monospace")


@dataclass(frozen=True)
class SampleTweet:
    """A test tweet of a bundled sample set: its text, its image and crops (file paths), for RE its entities, for
    grounded NER its crops' boxes (as the page's box input reads them)."""

    text: str
    image: str
    objects: tuple[str, ...]
    head: str = ""
    tail: str = ""
    boxes: str = ""


@cache
def sample_tweets(task: Task) -> tuple[SampleTweet, ...]:
    """The first `NUM_SAMPLE_TWEETS` test tweets of the bundled sample set of `task` (read by the package's loaders)
    that have an image, an object crop and something to find: an entity (NER, grounded NER), a relation other than
    none (RE)."""
    sources = sample_sources(task.name)
    if task is GMNER:
        test = load_gmner_dataset(**sources)["test"]
        found = (
            SampleTweet(
                " ".join(tweet["tokens"]),
                tweet["image"],
                tuple(tweet["objects"]),
                boxes="\n".join(" ".join(f"{side:g}" for side in box) for box in tweet["candidate_boxes"]),
            )
            for tweet in test
            if tweet["image"] and tweet["objects"] and tweet["entities"]
        )
    elif task is NER:
        test = load_mner_dataset(**sources)["test"]
        found = (
            SampleTweet(" ".join(tweet["tokens"]), tweet["image"], tuple(tweet["objects"]))
            for tweet in test
            if tweet["image"] and tweet["objects"] and any(tweet["ner_tags"])
        )
    else:
        test = load_mre_dataset(**sources)["test"]
        no_relation = test.features["relation"].str2int(NO_RELATION)
        found = (
            SampleTweet(
                " ".join(tweet["tokens"]),
                tweet["image"],
                tuple(tweet["objects"]),
                head=tweet["head"]["name"],
                tail=tweet["tail"]["name"],
            )
            for tweet in test
            if tweet["image"] and tweet["objects"] and tweet["relation"] != no_relation
        )
    return tuple(islice(found, NUM_SAMPLE_TWEETS))


class InputError(ValueError):
    """An input the page reports to the person, in their terms."""


def load_pipeline(model: str) -> Pipeline:
    """The NER, RE or grounded NER pipeline of a trained HVPNeT model folder or Hub id, chosen by the architecture its
    config records; an `InputError` naming `model` when it is not one."""
    try:
        pipeline_class = PIPELINE_FOR_TASK[task_of(model)]
    except OSError as error:
        raise InputError(f"`{model}` is not an HVPNeT model: its config cannot be read ({error})") from error
    except ValueError as error:
        raise InputError(f"`{model}` is not an HVPNeT NER, RE or grounded NER model ({error})") from error
    try:
        return pipeline_class(model=pipeline_class.auto_model_class.from_pretrained(model))
    except (OSError, ValueError, StrictDataclassError) as error:  # the last: a config.json with a refused setting
        raise InputError(f"`{model}` could not be loaded as an HVPNeT model: {error}") from error


def find_span(words: Sequence[str], mention: str, role: str) -> tuple[int, int]:
    """The word span `(start, end)` of the first occurrence of `mention`'s words in `words`."""
    wanted = mention.split()
    if not wanted:
        raise InputError(f"Enter the {role} entity, as it is written in the text.")
    for start in range(len(words) - len(wanted) + 1):
        if list(words[start : start + len(wanted)]) == wanted:
            return start, start + len(wanted)
    raise InputError(f"The {role} entity `{mention}` is not in the text (its words must appear as written).")


def read_boxes(text: str | None) -> list[list[float]]:
    """The candidate boxes typed in the page, one `xmin ymin xmax ymax` line each (pixels, commas allowed); an
    `InputError` naming the line that is not such a box."""
    boxes = []
    for number, line in enumerate((text or "").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            box = [float(side) for side in line.replace(",", " ").split()]
        except ValueError:
            box = []
        if len(box) != 4 or not (box[0] < box[2] and box[1] < box[3]):
            raise InputError(
                f"Candidate box line {number} `{line.strip()}` is not a box: write `xmin ymin xmax ymax` (pixels), "
                "with xmin < xmax and ymin < ymax."
            )
        boxes.append(box)
    return boxes


def read_image(path: str | None, what: str) -> Image.Image | None:
    """The uploaded image file at `path` decoded as RGB (None for no upload); an `InputError` naming the file when
    PIL cannot decode it or refuses it as a decompression bomb."""
    if path is None:
        return None
    try:
        image = load_image(path)
    except OSError as error:
        cause = error.__cause__ if error.__cause__ is not None else error
        if isinstance(cause, Image.DecompressionBombError):
            reason = f"it is too large to decode ({cause})"
        else:
            reason = f"it is not an image this page can read ({cause})"
        raise InputError(f"The {what} `{Path(path).name}` was not used: {reason}") from error
    return image.convert("RGB")


def draw_boxes(
    image: Image.Image, boxes: Sequence[Sequence[float]], labels: Sequence[str] | None = None
) -> Image.Image:
    """A copy of `image` for display, with `boxes` (xmin, ymin, xmax, ymax) outlined and labeled with `labels` (by
    default numbered); an image smaller than `DISPLAY_SIZE` is first enlarged by a whole factor (its pixels as
    blocks), so it can be seen."""
    scale = max(1, DISPLAY_SIZE // max(image.size))
    drawn = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    pencil = ImageDraw.Draw(drawn)
    width = max(2, round(min(drawn.size) / 100))
    labels = labels if labels is not None else [str(number) for number in range(1, len(boxes) + 1)]
    for box, label in zip(boxes, labels, strict=True):
        box = tuple(scale * side for side in box)
        pencil.rectangle(box, outline=BOX_COLOR, width=width)
        pencil.text((box[0] + width + 2, box[1] + width), label, fill=BOX_COLOR)
    return drawn


@torch.no_grad()
def example_gates(classifier: Pipeline, inputs: dict[str, Any]) -> dict[str, dict] | None:
    """
    The gate weights of one input, as `analysis.gates.figure` draws them: the global image's, and the mean over its
    present crops, each `{"mean": (L, c) list or None, "images": count}`; None when no image is present. The gates
    depend on the images only, so the first row of a long NER text (read in windows) stands for all of them.
    """
    features = classifier.preprocess(inputs)["features"]
    if not features:
        return None
    batch = classifier.processor.pad(features[:1])
    config = classifier.model.config
    gate_weights = classifier.model(**batch, output_gate_weights=True).gate_weights  # (1, n, L, c)
    if gate_weights is None:
        return None
    present = slot_presence(batch, config, gate_weights.shape[1])[0]  # (n,)
    is_global = torch.zeros_like(present)
    is_global[0] = config.use_global_image
    gates = {}
    for group, slots in (("global image", is_global), ("object crops", ~is_global)):
        chosen = present & slots
        count = int(chosen.sum())
        gates[group] = {"mean": gate_weights[0][chosen].mean(dim=0).tolist() if count else None, "images": count}
    return gates if any(entry["images"] for entry in gates.values()) else None


def gates_figure(gates: dict[str, dict] | None) -> Image.Image | None:
    """The heat maps of `example_gates` drawn as an RGB image (None without gates)."""
    if gates is None:
        return None
    figure = gates_heat_maps(gates)
    figure.canvas.draw()
    image = Image.fromarray(np.asarray(figure.canvas.buffer_rgba())).convert("RGB")
    pyplot().close(figure)
    return image


class HVPNetApp:
    """
    What the page runs: one model's pipeline (or the message saying why it could not be loaded) and, with
    `detector`, an `ObjectCropper` for inputs without crops.
    """

    def __init__(self, model: str, detector: str | None = None):
        self.model_name = model
        self.load_error: str | None = None
        self.classifier: Pipeline | None = None
        try:
            self.classifier = load_pipeline(model)
        except InputError as error:
            self.load_error = str(error)
        self.cropper = None
        if detector is not None and self.classifier is not None:
            num_objects = self.classifier.processor.image_processor.num_object_images
            self.cropper = ObjectCropper(detector, num_objects=num_objects)

    @property
    def task(self) -> Task:
        """The model's task (NER's layout when the model could not be loaded)."""
        return NER if self.classifier is None else self.classifier.hvpnet_task

    def predict(
        self,
        text: str | None,
        image_path: str | None,
        object_paths: Sequence[str] | None,
        detect: bool = False,
        head: str = "",
        tail: str = "",
        boxes: str = "",
    ) -> dict[str, Any]:
        """
        Everything the page shows for one input, under the names of its output boxes: `status` (Markdown; the
        message for bad input, when the other entries are empty), `spans` (highlighted text), `relations` and
        `relations_masked` ({relation: score}, RE), `spans_masked`, `changes` (Markdown), `regions` (Markdown,
        grounded NER), `image` (with the detected crops' boxes drawn, or for grounded NER each entity's region),
        `crops` (the crop images used) and `gates` (the heat map image). `boxes` are the grounded NER candidates'
        boxes (see `read_boxes`).
        """
        try:
            return self._predict(text, image_path, object_paths, detect, head, tail, boxes)
        except InputError as error:
            return {"status": f"**{error}**"}
        except (ValueError, TypeError, OSError) as error:  # what the pipelines raise for inputs they refuse
            return {"status": f"**The model could not read this input: {error}**"}

    def _predict(self, text, image_path, object_paths, detect, head, tail, typed_boxes) -> dict[str, Any]:
        if self.classifier is None:
            raise InputError(self.load_error)
        text = (text or "").strip()
        words, offsets = split_words(text)
        if not words:
            raise InputError("Enter a text: it is empty.")
        image = read_image(image_path, "image")
        crops = [read_image(path, "crop") for path in object_paths or []]
        spans = {}
        if self.task is RE:
            spans = {role: find_span(words, mention, role) for role, mention in (("head", head), ("tail", tail))}
        boxes = read_boxes(typed_boxes) if self.task is GMNER else []
        if boxes and crops and len(boxes) != len(crops):
            raise InputError(f"{len(crops)} crop(s) but {len(boxes)} candidate box(es): give one box per crop.")
        if boxes and not crops:
            if image is None:
                raise InputError("Candidate boxes without crops are cut from the image: give the image.")
            crops = [image.crop(tuple(box)) for box in boxes]
        if self.task is GMNER and crops and not boxes:
            raise InputError("A grounding model needs each crop's box: give one candidate box per crop.")
        if detect and not crops and image is not None and self.cropper is not None:
            mentions = [" ".join(words[start:end]) for start, end in spans.values()]
            found = self.cropper.detect(image, text_queries(words, mentions))
            boxes = [detected.box for detected in found]
            crops = [image.crop(box) for box in boxes]
        num_slots = self.classifier.processor.image_processor.num_object_images
        unused = f" ({len(crops) - num_slots} more crop(s) given than the model's {num_slots} slots: not used)"
        unused = unused if len(crops) > num_slots else ""
        crops, boxes = crops[:num_slots], boxes[:num_slots]
        if self.task is NER:
            inputs = {"text": text, "image": image, "objects": crops}
            shown = self._ner_outputs(text, inputs)
        elif self.task is GMNER:
            inputs = {"text": text, "image": image, "objects": crops, "boxes": boxes}
            shown = self._ner_outputs(text, inputs)
        else:
            inputs = {"words": words, "head": spans["head"], "tail": spans["tail"], "image": image, "objects": crops}
            shown = self._re_outputs(text, offsets, inputs)
        used = "no image" if image is None else f"the image and {len(crops)} crop(s)"
        drawn = None
        if image is not None:
            drawn = (
                draw_boxes(image, boxes) if self.task is not GMNER else grounded_picture(image, shown.pop("grounded"))
            )
        return {
            **shown,
            "status": f"Prediction of `{self.model_name}` with {used}{unused}; below it, the same text with the image "
            "masked.",
            "image": drawn,
            "crops": crops,
            "gates": gates_figure(example_gates(self.classifier, inputs)),
        }

    def _ner_outputs(self, text: str, inputs: dict[str, Any]) -> dict[str, Any]:
        with_image = self.classifier(inputs)
        masked = self.classifier({"text": text})
        shown = {
            "spans": highlighted(text, with_image),
            "spans_masked": highlighted(text, masked),
            "changes": entity_changes(with_image, masked),
        }
        if self.task is GMNER:
            shown.update(grounded=with_image, regions=region_table(with_image))
        return shown

    def _re_outputs(self, text: str, offsets: list[tuple[int, int]], inputs: dict[str, Any]) -> dict[str, Any]:
        num_relations = len(self.classifier.model.config.id2label)
        with_image = self.classifier(inputs, top_k=num_relations)
        masked = self.classifier({**inputs, "image": None, "objects": None}, top_k=num_relations)
        entities = [
            {"entity_group": role, "start": offsets[inputs[role][0]][0], "end": offsets[inputs[role][1] - 1][1]}
            for role in ("head", "tail")
        ]
        return {
            "spans": highlighted(text, entities),
            "relations": {ranked["relation"]: ranked["score"] for ranked in with_image},
            "relations_masked": {ranked["relation"]: ranked["score"] for ranked in masked},
            "changes": relation_change(with_image[0], masked[0]),
        }


def grounded_picture(image: Image.Image, entities: Sequence[dict]) -> Image.Image:
    """`image` with the region of each grounded entity (a `multimodal-gmner` output with a `box`) drawn, labeled with
    the entity's words and type (see `draw_boxes`)."""
    grounded = [entity for entity in entities if entity["box"] is not None]
    labels = [f"{entity['word']} ({entity['entity_group']})" for entity in grounded]
    return draw_boxes(image, [entity["box"] for entity in grounded], labels)


def region_table(entities: Sequence[dict]) -> str:
    """A Markdown table of the entities of a `multimodal-gmner` output: each one's region (its box in the image's
    pixels, or none) and the probability of that choice."""
    if not entities:
        return "No entity found, so no region."
    rows = ["| entity | type | region (xmin, ymin, xmax, ymax) | region score |", "|---|---|---|---|"]
    for entity in entities:
        box = entity["box"]
        region = "none (not in the picture)" if box is None else ", ".join(f"{side:g}" for side in box)
        rows.append(f"| {entity['word']} | {entity['entity_group']} | {region} | {entity['region_score']:.3f} |")
    return "\n".join(rows)


def highlighted(text: str, entities: Sequence[dict]) -> dict[str, Any]:
    """`text` with the character spans of `entities` (pipeline outputs with `start` and `end`), labeled by type, as
    gradio's `HighlightedText` takes it."""
    return {
        "text": text,
        "entities": [
            {"entity": entity["entity_group"], "start": entity["start"], "end": entity["end"]} for entity in entities
        ],
    }


def entity_changes(with_image: Sequence[dict], masked: Sequence[dict]) -> str:
    """A Markdown table of the entities found with the image or with it masked, and their scores in each."""
    keyed_with = {(entity["start"], entity["end"], entity["entity_group"]): entity for entity in with_image}
    keyed_masked = {(entity["start"], entity["end"], entity["entity_group"]): entity for entity in masked}
    if not keyed_with and not keyed_masked:
        return "No entity found, with the image or without it."
    rows = ["| entity | type | score with the image | score with the image masked |", "|---|---|---|---|"]
    for key in sorted(keyed_with.keys() | keyed_masked.keys()):
        entity = keyed_with.get(key) or keyed_masked[key]
        scores = [
            f"{found[key]['score']:.3f}" if key in found else "not found" for found in (keyed_with, keyed_masked)
        ]
        rows.append(f"| {entity['word']} | {key[2]} | {scores[0]} | {scores[1]} |")
    changed = len(keyed_with.keys() ^ keyed_masked.keys())
    summary = (
        f"The image changed {changed} entit{'y' if changed == 1 else 'ies'}."
        if changed
        else ("The image changed no entity (only the scores).")
    )
    return summary + "\n\n" + "\n".join(rows)


def relation_change(with_image: dict, masked: dict) -> str:
    """One sentence saying whether masking the image changes the predicted relation."""
    if with_image["relation"] == masked["relation"]:
        return (
            f"With the image masked the relation stays `{masked['relation']}` "
            f"(score {with_image['score']:.3f} with the image, {masked['score']:.3f} without)."
        )
    return (
        f"The image changed the relation: `{with_image['relation']}` ({with_image['score']:.3f}) with it, "
        f"`{masked['relation']}` ({masked['score']:.3f}) with it masked."
    )


def gradio():
    """The `gradio` module, or a clear error naming the extra to install."""
    try:
        import gradio
    except ImportError as error:
        raise ImportError("the web app needs gradio: pip install 'hvpnet_hf[app]'") from error
    return gradio


def build_page(app: HVPNetApp):
    """The gradio page of `app` (a `gradio.Blocks`, not yet launched)."""
    gr = gradio()
    is_re, is_gmner = app.task is RE, app.task is GMNER
    with gr.Blocks(title="HVPNeT", analytics_enabled=False) as page:
        gr.Markdown(page_header(app))
        if app.classifier is None:
            gr.Markdown(f"**{app.load_error}**", elem_id="load-error")
            return page
        with gr.Row():
            with gr.Column():
                text = gr.Textbox(label="Text", lines=2, elem_id="text")
                head = gr.Textbox(label="Head entity (as written in the text)", visible=is_re, elem_id="head")
                tail = gr.Textbox(label="Tail entity (as written in the text)", visible=is_re, elem_id="tail")
                image = gr.File(label="Image", type="filepath", elem_id="image")
                objects = gr.File(
                    label="Object crops (optional)", file_count="multiple", type="filepath", elem_id="objects"
                )
                boxes = gr.Textbox(
                    label="Candidate boxes: one `xmin ymin xmax ymax` line per crop, in the image's pixels (without "
                    "crops, the crops are cut from the image)",
                    lines=3,
                    visible=is_gmner,
                    elem_id="boxes",
                )
                detect = gr.Checkbox(
                    label="Detect object crops (for an image without crops)",
                    visible=app.cropper is not None,
                    elem_id="detect",
                )
                submit = gr.Button("Predict", variant="primary", elem_id="predict")
                sample_inputs = {NER: [text, image, objects], RE: [text, head, tail, image, objects]}
                gr.Examples(
                    [sample_row(tweet, app.task) for tweet in sample_tweets(app.task)],
                    inputs=sample_inputs.get(app.task, [text, image, objects, boxes]),
                    label="Sample tweets (from the bundled sample set)",
                )
            with gr.Column():
                status = gr.Markdown(elem_id="status")
                outputs = {
                    "spans": gr.HighlightedText(label="With the image", color_map=SPAN_COLORS, elem_id="spans"),
                    "relations": gr.Label(label="Relations with the image", visible=is_re, elem_id="relations"),
                    "spans_masked": gr.HighlightedText(
                        label="With the image masked",
                        color_map=SPAN_COLORS,
                        visible=not is_re,
                        elem_id="spans-masked",
                    ),
                    "relations_masked": gr.Label(
                        label="Relations with the image masked", visible=is_re, elem_id="relations-masked"
                    ),
                    "changes": gr.Markdown(elem_id="changes"),
                    "regions": gr.Markdown(visible=is_gmner, elem_id="regions"),
                }
        with gr.Row():
            shown_image = "each entity's region drawn" if is_gmner else "boxes drawn where crops were detected"
            outputs["image"] = gr.Image(label=f"The image ({shown_image})", height=280, elem_id="image-used")
            outputs["crops"] = gr.Gallery(label="The crops the model read", columns=3, height=280, elem_id="crops")
        gr.Markdown(
            "**Gate weights of this example**: how much each text layer (rows) takes from each backbone stage "
            "(columns), as in the paper's Figure 4."
        )
        outputs["gates"] = gr.Image(show_label=False, elem_id="gates")
        inputs = [text, image, objects, detect, head, tail, boxes]
        names = ["status", *outputs]

        def run(*values):
            shown = app.predict(*values)
            return [shown.get(name) for name in names]

        submit.click(run, inputs=inputs, outputs=[status, *outputs.values()])
    return page


def sample_row(tweet: SampleTweet, task: Task) -> list:
    """The values a sample tweet gives the page's inputs (text, for RE head and tail, image, crops, for grounded NER
    the crops' boxes)."""
    files = [tweet.image, list(tweet.objects)]
    if task is RE:
        return [tweet.text, tweet.head, tweet.tail, *files]
    return [tweet.text, *files, tweet.boxes] if task is GMNER else [tweet.text, *files]


def page_header(app: HVPNetApp) -> str:
    """The page's title and what the model does."""
    title = "# HVPNeT: multimodal entities and relations in tweets"
    if app.classifier is None:
        return title
    labels = app.classifier.model.config.id2label
    if app.task is not RE:
        types = sorted({label[2:] for label in labels.values() if label != "O"})
        what = f"named entities ({', '.join(types)})"
        if app.task is GMNER:
            what += " and the region of the image each one is in (or none)"
    else:
        what = f"the relation (one of {len(labels)}) between a head and a tail entity"
    return (
        f"{title}\n\nModel `{app.model_name}` finds {what} in a text, helped by its image and object crops "
        "(Chen et al., NAACL 2022 Findings). Pick a sample tweet or give your own text and image."
    )


def launch(app: HVPNetApp, port: int | None = None, block: bool = True):
    """Serves the page of `app` on localhost (or where `GRADIO_SERVER_NAME` says, as on a Space); returns the page
    (serving in the background unless `block`)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the page's own analytics are off in `build_page`
    gr = gradio()
    page = build_page(app)
    theme = gr.themes.Default(font=list(FONTS), font_mono=list(MONO_FONTS))
    page.launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),  # a Space sets its own
        server_port=port,
        prevent_thread_lock=not block,
        allowed_paths=[str(SAMPLE_DIR)],
        theme=theme,
        footer_links=[],
        quiet=not block,
    )
    return page


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m hvpnet_hf.app", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", required=True, help="folder or Hub id of a trained HVPNeT NER, RE or grounded NER model"
    )
    parser.add_argument("--port", type=int, default=None, help="port on localhost (default: gradio's, 7860 or next)")
    parser.add_argument("--detector", help="detection model (Hub id or folder) that finds crops for images without")
    args = parser.parse_args(argv)
    launch(HVPNetApp(args.model, detector=args.detector), port=args.port)


if __name__ == "__main__":
    main()
