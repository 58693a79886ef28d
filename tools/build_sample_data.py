"""Build the multimodal sample sets bundled in `hvpnet_hf/sample_data/` from a fixed seed (a development tool of the
repository, not part of the package).

    python tools/build_sample_data.py [--output_dir DIR] [--seed N] [--cues {color,texture}]

Three small data sets are written in the file formats of the published releases (as zjunlp/HVPNeT reads them), so
the real loaders read them:

- `twitter/`: Twitter-2015/2017-style NER (`IMGID:` blocks of `token<TAB>label`, `images/<id>.jpg`, object crops
  under `aux_images/{train,val,test}/crops/` and `twitter_{train,val,test}_dict.pth` keyed by image file name).
- `mnre/`: MNRE-style relation extraction (one Python literal per line in `txt/mnre_{train,val,test}.txt`, images
  under `img_org/{train,val,test}/`, crops under `img_vg/{train,val,test}/crops/`, `txt/mre_{train,dev,test}_dict.pth`
  keyed by the sample's line index, and `mnre_rel2id.json`).
- `gmner/`: Twitter-GMNER-style grounded NER (`txt/{train,dev,test}.txt`, Pascal VOC boxes `xml/<id>.xml` named by
  the entity's string, `images/<id>.jpg`), with candidate regions as `hvpnet-extract-objects` writes them
  (`objects/{train,val,test}/crops/`, `objects_<split>_dict.pth`, `objects_<split>_boxes.json`). The text decides
  the types; each groundable entity's type shape is painted in a grid cell of its own (its gold box), some entities
  are not painted (ungroundable), some pictures show the shape of an unmentioned type (a distractor candidate) and
  a few painted shapes are missed by the "detector" (not among the candidates).

About half of the examples are ambiguous from the text: the same tweet occurs once per candidate label (an entity
type, or a relation) with a different picture, and only the picture tells which label is right. Every picture is
a painted scene whose dominant colors and large shape encode a class, with jitter and noise; irrelevant pictures
are low-saturation clutter. `--cues texture` writes a harder variant (not bundled; `benchmarks/bench_image_use.py`
measures with it): the same construction and sizes, but the field and the object of a cue picture are covered with
a texture that encodes the class, in colors and a shape drawn at random for every picture, so the colors tell
nothing. `hvpnet_hf/sample_data/README.md` explains the construction.
"""

import argparse
import colorsys
import json
import random
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import torch
from PIL import Image, ImageDraw

from hvpnet_hf.pipelines import bio_entities
from hvpnet_hf.sample_data import SAMPLE_DIR

DEFAULT_SEED = 2022
IMAGE_SIZE = 64
JPEG_QUALITY = 85
SPLITS = ("train", "valid", "test")
# Image and crop folders follow the releases: the validation split is "val" there, and "dev" in MNRE's crop dicts.
IMAGE_SPLIT_NAMES = {"train": "train", "valid": "val", "test": "test"}
MNRE_DICT_SPLIT_NAMES = {"train": "train", "valid": "dev", "test": "test"}

# Number of ambiguous groups (each written once per candidate label) and of text-determined examples per split.
NER_SIZES = {"train": (85, 130), "valid": (28, 44), "test": (28, 44)}
MRE_SIZES = {"train": (60, 160), "valid": (21, 56), "test": (21, 56)}

MNRE_RELATIONS = (
    "None",
    "/per/per/parent",
    "/per/per/siblings",
    "/per/per/couple",
    "/per/per/neighbor",
    "/per/per/peer",
    "/per/per/charges",
    "/per/per/alumi",
    "/per/per/alternate_names",
    "/per/org/member_of",
    "/per/loc/place_of_residence",
    "/per/loc/place_of_birth",
    "/org/org/alternate_names",
    "/org/org/subsidiary",
    "/org/loc/locate_at",
    "/loc/loc/contain",
    "/per/misc/present_in",
    "/per/misc/awarded",
    "/per/misc/race",
    "/per/misc/religion",
    "/per/misc/nationality",
    "/misc/misc/part_of",
    "/misc/loc/held_on",
)


# ----------------------------------------------------------------------------------------------------------------
# Pictures
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneStyle:
    """A visual class: a dominant color field and one large object (the part the object crop shows).

    Colors are (hue in degrees, saturation, value); `ground` optionally paints the lower third in a second color.
    """

    field: tuple[float, float, float]
    thing: tuple[float, float, float]
    shape: str
    ground: tuple[float, float, float] | None = None


NER_STYLES = {
    "PER": SceneStyle(field=(30, 0.6, 0.9), thing=(345, 0.45, 0.95), shape="face"),
    "LOC": SceneStyle(field=(210, 0.55, 0.9), thing=(230, 0.35, 0.45), shape="mountain", ground=(110, 0.6, 0.6)),
    "ORG": SceneStyle(field=(0, 0.75, 0.8), thing=(55, 0.15, 1.0), shape="logo"),
    "MISC": SceneStyle(field=(280, 0.55, 0.6), thing=(55, 0.8, 0.95), shape="stripes"),
}
MRE_STYLES = {
    "/per/per/couple": SceneStyle(field=(330, 0.45, 0.95), thing=(0, 0.8, 0.85), shape="pair"),
    "/per/per/siblings": SceneStyle(field=(120, 0.5, 0.7), thing=(30, 0.7, 0.95), shape="pair"),
    "/per/per/peer": SceneStyle(field=(220, 0.5, 0.75), thing=(185, 0.5, 0.9), shape="desk"),
    "/per/misc/awarded": SceneStyle(field=(48, 0.75, 0.95), thing=(25, 0.6, 0.45), shape="trophy"),
    "/per/misc/present_in": SceneStyle(field=(275, 0.55, 0.6), thing=(60, 0.3, 1.0), shape="stripes"),
    "/org/loc/locate_at": SceneStyle(field=(165, 0.5, 0.6), thing=(210, 0.2, 0.75), shape="towers"),
}
SHAPES = ("face", "mountain", "logo", "stripes", "pair", "desk", "trophy", "towers")


@dataclass(frozen=True)
class TextureStyle:
    """A visual class of the harder variant (`--cues texture`): a texture covering the field and the large object.

    Colors and the object's shape are drawn at random for every picture, the same way for every class, so only the
    texture tells the classes apart.
    """

    texture: str


TEXTURES = ("horizontal", "vertical", "rising", "falling", "checks", "diamonds")
NER_TEXTURES = {
    "PER": TextureStyle("horizontal"),
    "LOC": TextureStyle("vertical"),
    "ORG": TextureStyle("checks"),
    "MISC": TextureStyle("rising"),
}
MRE_TEXTURES = {relation: TextureStyle(texture) for relation, texture in zip(MRE_STYLES, TEXTURES, strict=True)}
# What decides the image-decided labels: each class's colors and shape (the bundled sets), or its texture alone.
CUES = {"color": (NER_STYLES, MRE_STYLES), "texture": (NER_TEXTURES, MRE_TEXTURES)}


def _rgb(hsv: tuple[float, float, float]) -> np.ndarray:
    hue, saturation, value = hsv
    return np.array(colorsys.hsv_to_rgb((hue % 360) / 360, saturation, value))


def _jitter(rng: random.Random, hsv: tuple[float, float, float], hue: float = 12, sv: float = 0.1):
    return (
        hsv[0] + rng.uniform(-hue, hue),
        min(max(hsv[1] + rng.uniform(-sv, sv), 0.0), 1.0),
        min(max(hsv[2] + rng.uniform(-sv, sv), 0.05), 1.0),
    )


def _fill(rgb: np.ndarray) -> tuple[int, int, int]:
    return tuple(int(round(c * 255)) for c in rgb)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], color, rng: random.Random):
    """Paint one large object filling most of `box` (left, top, right, bottom)."""
    left, top, right, bottom = box
    width, height = right - left, bottom - top
    fill = _fill(color)
    if shape == "face":
        draw.ellipse(box, fill=fill)
    elif shape == "mountain":
        draw.polygon([(left, bottom), ((left + right) // 2 + rng.randint(-4, 4), top), (right, bottom)], fill=fill)
    elif shape == "logo":
        draw.rectangle(box, fill=fill)
        inset = max(width // 4, 2)
        draw.rectangle((left + inset, top + inset, right - inset, bottom - inset), fill=_fill(color * 0.6))
    elif shape == "stripes":
        step = rng.randint(5, 7)
        for offset in range(-height, width, step * 2):
            draw.polygon(
                [(left + offset, bottom), (left + offset + step, bottom), (left + offset + step + height, top),
                 (left + offset + height, top)],
                fill=fill,
            )  # fmt: skip
    elif shape == "pair":
        radius = min(width // 3, height // 2)
        draw.ellipse((left, top, left + 2 * radius, top + 2 * radius), fill=fill)
        draw.ellipse((right - 2 * radius, bottom - 2 * radius, right, bottom), fill=fill)
    elif shape == "desk":
        draw.rectangle((left, top + height // 2, right, bottom), fill=fill)
        draw.rectangle((left + width // 4, top, right - width // 4, top + height // 2), fill=_fill(color * 0.7))
    elif shape == "trophy":
        draw.polygon([(left, top), (right, top), ((left + right) // 2, top + 2 * height // 3)], fill=fill)
        draw.rectangle((left + width // 3, top + 2 * height // 3, right - width // 3, bottom), fill=fill)
    elif shape == "towers":
        for index in range(3):
            tower_left = left + index * width // 3
            draw.rectangle(
                (tower_left + 1, top + rng.randint(0, height // 2), tower_left + width // 3 - 1, bottom), fill=fill
            )
    else:
        raise ValueError(f"unknown shape {shape!r}")


def texture_mask(texture: str, period: int, phase: int) -> np.ndarray:
    """(IMAGE_SIZE, IMAGE_SIZE) bool: the pixels of a two-color `texture` painted in its second color (about half
    of them for an even `period`), repeating every `period` pixels and shifted by `phase`."""
    rows, columns = np.indices((IMAGE_SIZE, IMAGE_SIZE)) + phase
    half = period // 2
    patterns = {
        "horizontal": rows % period < half,
        "vertical": columns % period < half,
        "rising": (rows + columns) % period < half,
        "falling": (rows - columns) % period < half,
        "checks": (rows // half + columns // half) % 2 == 0,
        "diamonds": ((rows + columns) // half + (rows - columns) // half) % 2 == 0,
    }
    if texture not in patterns:
        raise ValueError(f"unknown texture {texture!r}")
    return patterns[texture]


def _paint_texture(rng: random.Random, style: TextureStyle) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """(IMAGE_SIZE, IMAGE_SIZE, 3) floats in [0, 1]: a field and one large object of random colors and shape, both
    covered with `style.texture` (each with its own period and phase); and the object's box."""
    canvas = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3))
    object_box = _random_box(rng, 26, 40)
    outline = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE))
    # Any shape but "stripes", whose outline is itself a texture.
    shape = rng.choice([shape for shape in SHAPES if shape != "stripes"])
    _draw_shape(ImageDraw.Draw(outline), shape, object_box, np.ones(3), rng)
    for region in (np.ones((IMAGE_SIZE, IMAGE_SIZE), dtype=bool), np.asarray(outline)[..., 0] > 0):
        light = (rng.uniform(0, 360), rng.uniform(0.35, 0.8), rng.uniform(0.7, 0.95))
        dark = _jitter(rng, (light[0], light[1], light[2] * 0.5))
        mask = texture_mask(style.texture, 2 * rng.randint(2, 4), rng.randint(0, 7))
        canvas[region] = np.where(mask[..., None], _rgb(dark), _rgb(light))[region]
    return canvas, object_box


def _random_box(rng: random.Random, low: int, high: int) -> tuple[int, int, int, int]:
    width, height = rng.randint(low, high), rng.randint(low, high)
    left, top = rng.randint(0, IMAGE_SIZE - width), rng.randint(0, IMAGE_SIZE - height)
    return left, top, left + width, top + height


def _add_clutter(rng: random.Random, draw: ImageDraw.ImageDraw) -> list[tuple[int, int, int, int]]:
    """Paint 1-2 small gray clutter objects (the distractor crops); returns their boxes."""
    boxes = []
    for _ in range(rng.randint(1, 2)):
        box = _random_box(rng, 8, 16)
        clutter = (rng.uniform(0, 360), rng.uniform(0.0, 0.2), rng.uniform(0.2, 0.95))
        paint = draw.rectangle if rng.random() < 0.5 else draw.ellipse
        paint(box, fill=_fill(_rgb(clutter)))
        boxes.append(box)
    return boxes


def _to_image(canvas: np.ndarray) -> Image.Image:
    return Image.fromarray((canvas * 255).round().astype(np.uint8))


def paint_scene(rng: random.Random, style: SceneStyle | TextureStyle | None):
    """Paint a `IMAGE_SIZE` square RGB scene.

    `style=None` paints an irrelevant scene: a low-saturation field with gray clutter. Returns the image, the box of
    the large object (what a detector would crop) and the boxes of 1-2 small clutter objects (distractor crops).
    """
    if isinstance(style, TextureStyle):
        canvas, object_box = _paint_texture(rng, style)
        image = _to_image(canvas)
        clutter_boxes = _add_clutter(rng, ImageDraw.Draw(image))
    else:
        if style is None:
            neutral = (rng.uniform(0, 360), rng.uniform(0.0, 0.15), rng.uniform(0.3, 0.85))
            style = SceneStyle(field=neutral, thing=(rng.uniform(0, 360), 0.12, rng.uniform(0.2, 0.95)),
                               shape=rng.choice(SHAPES))  # fmt: skip
            field, thing = style.field, style.thing
        else:
            field, thing = _jitter(rng, style.field), _jitter(rng, style.thing)
        # Vertical shading, so the field is not one flat color.
        shade = np.linspace(rng.uniform(0.8, 1.0), rng.uniform(1.0, 1.2), IMAGE_SIZE)[:, None, None]
        canvas = np.clip(_rgb(field)[None, None, :] * shade * np.ones((IMAGE_SIZE, IMAGE_SIZE, 3)), 0, 1)
        if style.ground is not None:
            horizon = rng.randint(IMAGE_SIZE * 3 // 5, IMAGE_SIZE * 3 // 4)
            canvas[horizon:] = _rgb(_jitter(rng, style.ground))
        image = _to_image(canvas)
        draw = ImageDraw.Draw(image)
        clutter_boxes = _add_clutter(rng, draw)
        object_box = _random_box(rng, 26, 40)
        _draw_shape(draw, style.shape, object_box, _rgb(thing), rng)

    noise = np.random.default_rng(rng.getrandbits(32)).normal(0.0, 10.0, (IMAGE_SIZE, IMAGE_SIZE, 3))
    pixels = np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).round().astype(np.uint8)
    return Image.fromarray(pixels), object_box, clutter_boxes


def save_jpeg(image: Image.Image, path: Path) -> None:
    """JPEG with fixed settings (no EXIF, no timestamps), so re-running the build reproduces the same bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG", quality=JPEG_QUALITY, optimize=False)


@dataclass
class Picture:
    """What to paint for one example: a style (None = irrelevant scene), whether the file exists, crops wanted."""

    style: SceneStyle | TextureStyle | None
    present: bool = True
    num_cue_crops: int = 1
    num_distractor_crops: int = 1
    mode: str = "RGB"


def write_picture(rng: random.Random, picture: Picture, image_path: Path, crop_dir: Path, crop_stem: str) -> list[str]:
    """Paint and save one picture and its object crops; returns the crop file names (cue crops and distractors
    in random order, as a detector's ranking would mix them). A missing picture writes nothing."""
    if not picture.present:
        return []
    image, object_box, clutter_boxes = paint_scene(rng, picture.style)
    save_jpeg(image.convert(picture.mode), image_path)
    boxes = [object_box] * picture.num_cue_crops + clutter_boxes[: picture.num_distractor_crops]
    rng.shuffle(boxes)
    names = []
    for index, box in enumerate(boxes):
        pad = rng.randint(0, 3)
        left, top, right, bottom = box
        padded = (max(left - pad, 0), max(top - pad, 0), min(right + pad, IMAGE_SIZE), min(bottom + pad, IMAGE_SIZE))
        name = f"{crop_stem}_crop_{index}.jpg"
        save_jpeg(image.crop(padded), crop_dir / name)
        names.append(name)
    return names


def crop_plan(rng: random.Random, relevant: bool) -> tuple[int, int]:
    """How many cue and distractor crops an example gets: some get none, some only distractors."""
    draw = rng.random()
    if draw < 0.15:
        return 0, 0
    if not relevant:
        return 0, rng.randint(1, 2)
    if draw < 0.25:
        return 0, 1  # the detector missed the object: only the global picture carries the cue
    return 1, rng.randint(0, 2)


# ----------------------------------------------------------------------------------------------------------------
# Tweet text
# ----------------------------------------------------------------------------------------------------------------

HANDLES = ("news_daily", "jess_k", "MikeOnTour", "the_real_sam", "foodie4life", "sportscenter_fan", "ana_b92",
           "travelbug", "DJ_Kev", "lauren_xo", "TechCrunchy", "nightowl")  # fmt: skip
HASHTAGS = ("#tbt", "#blessed", "#weekend", "#mood", "#love", "#sundayfunday", "#nofilter", "#throwback",
            "#goals", "#instagood", "#fridayfeeling")  # fmt: skip
EMOJI = ("😍", "🔥", "🙌", "😂", "❤️", "🎉", "😭", "👏", "💯", "✨")
NER_NAMES = {
    "PER": ("Taylor Swift", "LeBron James", "Barack Obama", "Adele", "Lionel Messi", "Serena Williams", "Elon Musk",
            "Beyonce", "Tom Hanks", "Ed Sheeran", "Rihanna", "Cristiano Ronaldo", "Emma Watson", "Drake"),
    "LOC": ("London", "New York", "Tokyo", "Los Angeles", "Berlin", "Mexico City", "Cape Town", "Rome", "Miami",
            "Toronto", "San Francisco", "Seattle", "Lisbon", "Bali"),
    "ORG": ("Google", "NASA", "United Nations", "Starbucks", "Nike", "Microsoft", "BBC", "Real Madrid",
            "Manchester United", "Amazon", "Spotify", "Lakers", "Greenpeace", "Red Cross"),
    "MISC": ("Game of Thrones", "Super Bowl", "Oscars", "iPhone", "Coachella", "World Cup", "Star Wars",
             "Champions League", "Grammys", "Olympics", "Euro 2016", "Thanksgiving"),
}  # fmt: skip
# Surface forms that name things of two types; which one a tweet means is shown only by its picture.
AMBIGUOUS_NAMES = {
    ("PER", "LOC"): ("Jordan", "Washington", "Paris", "Georgia", "Austin", "Victoria", "Sydney", "Florence",
                     "Charlotte", "Savannah", "Dallas", "Madison", "Brooklyn", "Houston"),
    ("ORG", "LOC"): ("Chelsea", "Liverpool", "Barcelona", "Everton", "Notre Dame", "Golden State", "Sevilla",
                     "Valencia", "Boston", "Orlando"),
    ("ORG", "PER"): ("Ford", "Dior", "Chanel", "Disney", "Tesla", "Armani", "Versace", "Kellogg"),
    ("MISC", "LOC"): ("Casablanca", "Fargo", "Nashville", "Dunkirk", "Chicago", "Abbey Road", "Everest",
                      "Philadelphia"),
}  # fmt: skip
AMBIGUOUS_NER_FRAMES = (
    "Can't stop thinking about {E} 😍",
    "{E} tonight !!!",
    "Throwback to {E} #tbt",
    "Nothing beats {E} on a Sunday morning",
    "So much love for {E} right now ❤️",
    "{E} never disappoints 🔥",
    "{E} , you were amazing . See you again soon",
    "Who else is obsessed with {E} ?",
    "Still can't believe I finally saw {E} 😭",
    "{E} again ... never gets old",
    "Missing {E} already 💔",
    "Best weekend ever , all thanks to {E}",
    "Honestly {E} is everything",
    "First time at {E} and it was worth every penny",
)
NER_FRAMES = (
    "{PER} just landed in {LOC} for the {MISC} ✈️",
    "Breaking : {ORG} confirms {PER} as new CEO {url}",
    "{ORG} opens its first store in {LOC} today",
    "Watching the {MISC} with the whole family 🙌",
    "Flying to {LOC} tomorrow , can't wait to see {PER} live !",
    "{PER} signs a new deal with {ORG} until 2025 ⚽",
    "Great talk by {PER} from {ORG} this morning",
    "Traffic is terrible in {LOC} again 😂",
    "I'm not crying , you're crying : {PER} just won at the {MISC} !",
    "Mayor of {LOC} says the city will host the {MISC} next year",
    "{ORG} shares fell 4 % after the announcement {url}",
    "Good morning everyone ☀️ #mondaymotivation",
    "Can't sleep . Again . #insomnia",
    "Happy birthday to the one and only {PER} 🎂",
    "Volunteers from {ORG} are already on the ground in {LOC}",
    "This is what happens when you let me plan the trip 😂 {url}",
)
LONG_NER_TAIL = (
    "and honestly I have no idea how we are going to get back home tonight because every single train is "
    "cancelled , the buses are full and my phone is about to die so if you see this please send help and snacks"
)
NER_SUFFIXES = ("before flying back to {LOC}", "( thanks {PER} for the tickets )", "with the {ORG} crew",
                "while everyone else watches the {MISC}")  # fmt: skip


def _url(rng: random.Random) -> str:
    return "http://t.co/" + "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(10))


def _fill_frame(rng: random.Random, frame: str, slots: dict[str, tuple[list[str], str]]):
    """Turn a frame into (tokens, labels). `slots` maps a placeholder to (its tokens, its entity type or "O")."""
    tokens, labels = [], []
    for piece in frame.split():
        if piece.startswith("{") and piece.endswith("}"):
            key = piece[1:-1]
            if key == "url":
                tokens.append(_url(rng))
                labels.append("O")
                continue
            if key not in slots:
                slots[key] = (rng.choice(NER_NAMES[key]).split(), key)
            words, entity_type = slots[key]
            tokens.extend(words)
            labels.extend(
                ["O"] * len(words)
                if entity_type == "O"
                else [f"B-{entity_type}"] + [f"I-{entity_type}"] * (len(words) - 1)
            )
        else:
            tokens.append(piece)
            labels.append("O")
    return tokens, labels


def _decorate(rng: random.Random, tokens: list[str], labels: list[str], suffix: str | None):
    """Add the usual tweet furniture around a sentence: RT/@handle prefix, suffix clause, hashtag, emoji, URL."""
    draw = rng.random()
    if draw < 0.2:
        prefix = ["RT", "@" + rng.choice(HANDLES), ":"]
    elif draw < 0.4:
        prefix = ["@" + rng.choice(HANDLES)]
    else:
        prefix = []
    tokens, labels = prefix + tokens, ["O"] * len(prefix) + labels
    if suffix is not None:
        extra_tokens, extra_labels = _fill_frame(rng, suffix, {})
        tokens, labels = tokens + extra_tokens, labels + extra_labels
    furniture = ((0.5, lambda: rng.choice(HASHTAGS)), (0.3, lambda: rng.choice(EMOJI)), (0.3, lambda: _url(rng)))
    for chance, make in furniture:
        if rng.random() < chance:
            tokens, labels = tokens + [make()], labels + ["O"]
    return tokens, labels


def ambiguous_tweet(rng: random.Random, types: tuple[str, str], name: str):
    """One tweet text in which `name` could be either of `types`: returns (tokens, labels per type)."""
    suffix = rng.choice(NER_SUFFIXES) if rng.random() < 0.3 else None
    frame = rng.choice(AMBIGUOUS_NER_FRAMES)
    # Fill the frame once, so the ambiguous name's placeholder is the only thing that differs between readings.
    tokens, labels = _fill_frame(rng, frame, {"E": (name.split(), "O")})
    tokens, labels = _decorate(rng, tokens, labels, suffix)
    start = next(i for i in range(len(tokens)) if tokens[i : i + len(name.split())] == name.split())
    readings = {}
    for entity_type in types:
        reading = list(labels)
        reading[start] = f"B-{entity_type}"
        for offset in range(1, len(name.split())):
            reading[start + offset] = f"I-{entity_type}"
        readings[entity_type] = reading
    return tokens, readings


def plain_tweet(rng: random.Random):
    """A tweet whose entities are decided by the text; returns (tokens, labels, entity types present)."""
    frame = rng.choice(NER_FRAMES)
    if rng.random() < 0.08:
        frame = frame + " " + LONG_NER_TAIL
    tokens, labels = _fill_frame(rng, frame, {})
    tokens, labels = _decorate(rng, tokens, labels, rng.choice(NER_SUFFIXES) if rng.random() < 0.2 else None)
    types = sorted({label[2:] for label in labels if label != "O"})
    return tokens, labels, types


def irrelevant_picture(
    rng: random.Random, styles: dict[str, SceneStyle | TextureStyle], congruent: list[str]
) -> Picture:
    """Picture for a text-determined example: mostly unrelated clutter, sometimes a matching or a misleading
    scene (the text decides, so the picture must not be trusted blindly), sometimes missing or not RGB."""
    draw = rng.random()
    if draw < 0.08:
        return Picture(style=None, present=False)
    if draw < 0.28 and congruent:
        style = styles[rng.choice(congruent)]
    elif draw < 0.43:
        style = styles[rng.choice(sorted(styles))]
    else:
        style = None
    num_cue, num_distractor = crop_plan(rng, relevant=style is not None)
    mode = "L" if rng.random() < 0.03 else "CMYK" if rng.random() < 0.02 else "RGB"
    return Picture(style=style, num_cue_crops=num_cue, num_distractor_crops=num_distractor, mode=mode)


def cue_picture(rng: random.Random, style: SceneStyle | TextureStyle | None) -> Picture:
    num_cue, num_distractor = crop_plan(rng, relevant=style is not None)
    return Picture(style=style, num_cue_crops=num_cue, num_distractor_crops=num_distractor)


def draw_unique(seen: set, make, *args):
    """Call `make(*args)` until the token list it returns first is a text not drawn before in this split, so the
    only repeated texts of a split are the deliberate copies of an ambiguous group."""
    while True:
        drawn = make(*args)
        if tuple(drawn[0]) not in seen:
            seen.add(tuple(drawn[0]))
            return drawn


def build_twitter(rng: random.Random, root: Path, styles: dict[str, SceneStyle | TextureStyle] = NER_STYLES) -> None:
    ambiguous_pool = [(types, name) for types, names in AMBIGUOUS_NAMES.items() for name in names]
    image_counter = 100000
    for split in SPLITS:
        num_groups, num_plain = NER_SIZES[split]
        examples, seen = [], set()  # (tokens, labels, Picture)
        for _ in range(num_groups):
            types, name = rng.choice(ambiguous_pool)
            tokens, readings = draw_unique(seen, ambiguous_tweet, rng, types, name)
            for entity_type in types:
                examples.append((tokens, readings[entity_type], cue_picture(rng, styles[entity_type])))
        for _ in range(num_plain):
            tokens, labels, types = draw_unique(seen, plain_tweet, rng)
            examples.append((tokens, labels, irrelevant_picture(rng, styles, types)))
        rng.shuffle(examples)

        crop_map = {}
        blocks = []
        for tokens, labels, picture in examples:
            image_counter += rng.randint(1, 40)
            image_id = str(image_counter)
            crops = write_picture(
                rng, picture, root / "images" / f"{image_id}.jpg",
                root / "aux_images" / IMAGE_SPLIT_NAMES[split] / "crops", image_id,
            )  # fmt: skip
            if crops:
                crop_map[f"{image_id}.jpg"] = crops
            blocks.append(
                f"IMGID:{image_id}\n" + "".join(f"{t}\t{label}\n" for t, label in zip(tokens, labels, strict=True))
            )
        (root / f"{split}.txt").write_text("\n".join(blocks) + "\n", encoding="utf-8")
        torch.save(crop_map, root / f"twitter_{IMAGE_SPLIT_NAMES[split]}_dict.pth")


# ----------------------------------------------------------------------------------------------------------------
# Grounded NER
# ----------------------------------------------------------------------------------------------------------------

# Tweets per split of the grounding set (Twitter-GMNER's split files and the crop folders hvpnet-extract-objects
# writes), and the share of tweets with an `O_` id (no box file: every entity ungroundable, as in the release).
GMNER_SIZES = {"train": 180, "valid": 60, "test": 60}
GMNER_SPLIT_FILES = {"train": "train", "valid": "dev", "test": "test"}
GMNER_ANONYMOUS_SHARE = 0.05
# Chances that an entity is painted (groundable), that a painted entity's shape is among the candidates (the rest
# bound candidate recall), and that a picture shows the shape of a type its tweet does not mention (a distractor).
GROUNDABLE_SHARE = 0.7
DETECTED_SHARE = 0.9
DISTRACTOR_SHARE = 0.5
# A picture is a 2 x 2 grid: every painted shape gets a cell of its own, so no two gold boxes overlap.
GRID_CELL = IMAGE_SIZE // 2


@dataclass
class GroundedPicture:
    """A grounding picture: the shape boxes painted per entity surface string (the gold boxes), and the candidates
    a detector would return (shape and distractor boxes, padded as crops are, in a detector's mixed order)."""

    image: Image.Image
    gold_boxes: dict[str, list[tuple[int, int, int, int]]]
    candidates: list[tuple[int, int, int, int]]


def _cell_box(rng: random.Random, cell: int) -> tuple[int, int, int, int]:
    """A box of 18 to 28 pixels a side inside grid cell `cell` (0-3, row by row)."""
    width, height = rng.randint(18, 28), rng.randint(18, 28)
    left = (cell % 2) * GRID_CELL + rng.randint(0, GRID_CELL - width)
    top = (cell // 2) * GRID_CELL + rng.randint(0, GRID_CELL - height)
    return left, top, left + width, top + height


def paint_grounded_scene(
    rng: random.Random, painted: dict[str, str], distractors: Sequence[str]
) -> tuple[Image.Image, dict[str, tuple[int, int, int, int]]]:
    """
    A `IMAGE_SIZE` square picture on a low-saturation field with small gray clutter, and on top one `NER_STYLES`
    shape per entry of `painted` (surface string -> entity type) and per type of `distractors`, each in a grid cell
    of its own. Returns the picture and the box of each painted key (surface strings, then `"distractor <i>"`).
    """
    field = (rng.uniform(0, 360), rng.uniform(0.0, 0.15), rng.uniform(0.3, 0.85))
    shade = np.linspace(rng.uniform(0.8, 1.0), rng.uniform(1.0, 1.2), IMAGE_SIZE)[:, None, None]
    canvas = np.clip(_rgb(field)[None, None, :] * shade * np.ones((IMAGE_SIZE, IMAGE_SIZE, 3)), 0, 1)
    image = _to_image(canvas)
    _add_clutter(rng, ImageDraw.Draw(image))
    # Drawn before the shapes, so the same draws without shapes paint the same picture less its shapes.
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0.0, 10.0, (IMAGE_SIZE, IMAGE_SIZE, 3))
    shapes = list(painted.items()) + [(f"distractor {index}", kind) for index, kind in enumerate(distractors)]
    boxes = {}
    for (key, entity_type), cell in zip(shapes, rng.sample(range(4), len(shapes)), strict=True):
        style = NER_STYLES[entity_type]
        boxes[key] = left, top, right, bottom = _cell_box(rng, cell)
        # Painted on a copy and pasted back inside the box (stripes overshoot it; PIL paints the last column and row
        # it is given), so the shape's pixels are exactly those of [left, right) x [top, bottom).
        layer = image.copy()
        _draw_shape(ImageDraw.Draw(layer), style.shape, boxes[key], _rgb(_jitter(rng, style.thing)), rng)
        image.paste(layer.crop(boxes[key]), (left, top))
    pixels = np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).round().astype(np.uint8)
    return Image.fromarray(pixels), boxes


def grounded_picture(rng: random.Random, entities: list[tuple[str, str]], anonymous: bool) -> GroundedPicture:
    """
    Paint the picture of a tweet with `entities` ((surface string, type) pairs). Each entity is groundable with
    chance `GROUNDABLE_SHARE`, except a second entity of a type already painted (its shape would be ambiguous) and
    every entity of an `anonymous` tweet; a distractor shows the shape of a type the tweet does not mention.
    """
    painted: dict[str, str] = {}
    for text, entity_type in entities:
        if not anonymous and entity_type not in painted.values() and rng.random() < GROUNDABLE_SHARE:
            painted.setdefault(text, entity_type)
    unmentioned = sorted(set(NER_STYLES) - {entity_type for _, entity_type in entities})
    distractors = [rng.choice(unmentioned)] if unmentioned and rng.random() < DISTRACTOR_SHARE else []
    image, boxes = paint_grounded_scene(rng, painted, distractors)
    candidates = []
    for key, box in boxes.items():
        if key.startswith("distractor") or rng.random() < DETECTED_SHARE:
            pad = rng.randint(0, 2)
            candidates.append(
                (
                    max(box[0] - pad, 0),
                    max(box[1] - pad, 0),
                    min(box[2] + pad, IMAGE_SIZE),
                    min(box[3] + pad, IMAGE_SIZE),
                )
            )
    rng.shuffle(candidates)
    gold = {key: [box] for key, box in boxes.items() if not key.startswith("distractor")}
    return GroundedPicture(image, gold, candidates)


def voc_xml(image_file: str, boxes: dict[str, list[tuple[int, int, int, int]]]) -> str:
    """A Pascal VOC file as Twitter-GMNER's `xml/<id>.xml`: one `<object>` per box, named by the entity's string."""
    objects = "".join(
        f"\t<object>\n\t\t<name>{escape(name)}</name>\n\t\t<bndbox>\n"
        f"\t\t\t<xmin>{box[0]}</xmin>\n\t\t\t<ymin>{box[1]}</ymin>\n"
        f"\t\t\t<xmax>{box[2]}</xmax>\n\t\t\t<ymax>{box[3]}</ymax>\n\t\t</bndbox>\n\t</object>\n"
        for name, found in boxes.items()
        for box in found
    )
    return (
        f"<annotation>\n\t<filename>{image_file}</filename>\n\t<size>\n\t\t<width>{IMAGE_SIZE}</width>\n"
        f"\t\t<height>{IMAGE_SIZE}</height>\n\t\t<depth>3</depth>\n\t</size>\n{objects}</annotation>\n"
    )


def build_gmner(rng: random.Random, root: Path) -> None:
    """Twitter-GMNER-style grounded NER: `txt/{train,dev,test}.txt` (OTHER for MISC), `xml/<id>.xml`, `images/`,
    and the candidates as `hvpnet-extract-objects` writes them (`objects/<split>/crops/`, `objects_<split>_dict.pth`
    and `objects_<split>_boxes.json`)."""
    image_counter = 200000
    for split in SPLITS:
        crop_split = IMAGE_SPLIT_NAMES[split]
        blocks, crop_map, box_map, seen = [], {}, {}, set()
        for _ in range(GMNER_SIZES[split]):
            tokens, labels, _ = draw_unique(seen, plain_tweet, rng)
            entities = [(" ".join(tokens[first : last + 1]), kind) for kind, first, last in bio_entities(labels)]
            image_counter += rng.randint(1, 40)
            anonymous = rng.random() < GMNER_ANONYMOUS_SHARE
            image_id = f"O_{image_counter}" if anonymous else str(image_counter)
            picture = grounded_picture(rng, entities, anonymous)
            save_jpeg(picture.image, root / "images" / f"{image_id}.jpg")
            if not anonymous:
                xml = voc_xml(f"{image_id}.jpg", picture.gold_boxes)
                (root / "xml").mkdir(parents=True, exist_ok=True)
                (root / "xml" / f"{image_id}.xml").write_text(xml, encoding="utf-8")
            names = []
            for index, box in enumerate(picture.candidates):
                names.append(f"{image_id}_crop_{index}.jpg")
                save_jpeg(picture.image.crop(box), root / "objects" / crop_split / "crops" / names[-1])
            crop_map[f"{image_id}.jpg"] = names
            box_map[f"{image_id}.jpg"] = [list(box) for box in picture.candidates]
            tags = [label.replace("MISC", "OTHER") for label in labels]
            blocks.append(
                f"IMGID:{image_id}\n" + "".join(f"{t}\t{tag}\n" for t, tag in zip(tokens, tags, strict=True))
            )
        (root / "txt").mkdir(parents=True, exist_ok=True)
        (root / "txt" / f"{GMNER_SPLIT_FILES[split]}.txt").write_text("\n".join(blocks) + "\n", encoding="utf-8")
        torch.save(crop_map, root / "objects" / f"objects_{crop_split}_dict.pth")
        (root / "objects" / f"objects_{crop_split}_boxes.json").write_text(json.dumps(box_map) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# Relation sentences
# ----------------------------------------------------------------------------------------------------------------

MRE_NAMES = {
    "per": NER_NAMES["PER"] + ("Kim Kardashian", "Justin Bieber", "Zendaya", "Tom Holland", "Shakira", "Roger Federer"),
    "org": NER_NAMES["ORG"] + ("Apple", "Samsung", "Netflix", "Adidas", "FC Barcelona", "Juventus"),
    "loc": NER_NAMES["LOC"] + ("Paris", "Madrid", "Sydney", "Dubai", "California", "Texas"),
    "misc": ("Grammys", "Oscars", "Met Gala", "Super Bowl", "World Cup", "Coachella", "Champions League final",
             "Ballon d'Or", "Golden Globes", "Wimbledon", "Olympics", "Nobel Prize"),
    "nationality": ("French", "Canadian", "Brazilian", "Spanish", "Japanese", "American", "British"),
}  # fmt: skip
# Frames whose relation is decided by the picture: (head kind, tail kind, candidate relations, frames).
AMBIGUOUS_MRE_GROUPS = (
    ("per", "per", ("/per/per/couple", "/per/per/siblings", "/per/per/peer"), (
        "{H} and {T} , together again 😊 #tbt",
        "Throwback : {H} with {T} back in 2015",
        "Look who I ran into : {H} and {T} !",
        "{H} & {T} tonight ✨",
        "Can't believe {H} and {T} are here 😍 {url}",
    )),
    ("per", "misc", ("/per/misc/awarded", "/per/misc/present_in"), (
        "{H} at the {T} tonight 🎉",
        "Proud moment for {H} : {T} 2019",
        "{H} , {T} . Unreal night ✨ {url}",
        "RT @{handle} : {H} at the {T} , what a moment",
    )),
    ("org", "loc", ("/org/loc/locate_at", "None"), (
        "{H} in {T} 📍",
        "New pics : {H} , {T} {url}",
        "{H} x {T} 🔥",
        "RT @{handle} : {H} and {T} trending today",
    )),
)  # fmt: skip
# Frames whose relations the text decides: (frame, [(head slot, tail slot, relation), ...]).
MRE_FRAMES = (
    ("{A:per} , CEO of {B:org} , was born in {C:loc}", [("A", "B", "/per/org/member_of"),
     ("A", "C", "/per/loc/place_of_birth"), ("B", "C", "None")]),
    ("{A:per} and her brother {B:per} live in {C:loc} now", [("A", "B", "/per/per/siblings"),
     ("A", "C", "/per/loc/place_of_residence"), ("B", "C", "/per/loc/place_of_residence")]),
    ("{A:per} wins the {B:misc} for the third time 🏆 {url}", [("A", "B", "/per/misc/awarded")]),
    ("{A:per} married {B:per} in {C:loc} last weekend 💍", [("A", "B", "/per/per/couple"), ("A", "C", "None")]),
    ("{A:org} , a subsidiary of {B:org} , opened an office in {C:loc}", [("A", "B", "/org/org/subsidiary"),
     ("A", "C", "/org/loc/locate_at"), ("B", "C", "None")]),
    ("{A:per} and {B:per} are teammates at {C:org} this season", [("A", "B", "/per/per/peer"),
     ("A", "C", "/per/org/member_of"), ("B", "C", "/per/org/member_of")]),
    ("{B:loc} , the biggest city in {A:loc} , is flooding again", [("A", "B", "/loc/loc/contain")]),
    ("{A:per} performed at the {B:misc} in {C:loc} 🎤", [("A", "B", "/per/misc/present_in"),
     ("B", "C", "/misc/loc/held_on"), ("A", "C", "None")]),
    ("{A:per} , son of {B:per} , just turned 18 🎂", [("A", "B", "/per/per/parent")]),
    ("{A:per} , the {B:nationality} singer , drops a new album on Friday", [("A", "B", "/per/misc/nationality")]),
    ("Honestly {A:per} and {B:org} have nothing to do with each other , stop asking", [("A", "B", "None")]),
    ("Moving day ! {A:per} finally settled in {B:loc} and the view from the balcony is unreal , the kids love it "
     "and the dog has already found the beach , see you all at the housewarming next month 🏡", [
     ("A", "B", "/per/loc/place_of_residence")]),
)  # fmt: skip


def _relation_sentence(rng: random.Random, frames: Sequence[str], kinds: dict[str, str]):
    """Fill one of `frames`: `{X:kind}` / `{H}` / `{T}` / `{url}` / `{handle}` slots. Returns the tokens and the
    entity spans {slot: (name, start, end)} in word offsets, end exclusive."""
    tokens, spans, used = [], {}, set()
    for piece in rng.choice(frames).split():
        if not (piece.startswith("{") and piece.endswith("}")):
            tokens.append(piece)
            continue
        key = piece[1:-1]
        if key == "url":
            tokens.append(_url(rng))
        elif key == "handle":
            tokens.append("@" + rng.choice(HANDLES))
        else:
            slot, _, kind = key.partition(":")
            kind = kind or kinds[slot]
            name = rng.choice([n for n in MRE_NAMES[kind] if n not in used])
            used.add(name)
            spans[slot] = (name, len(tokens), len(tokens) + len(name.split()))
            tokens.extend(name.split())
    if rng.random() < 0.4:
        tokens.append(rng.choice(HASHTAGS))
    return tokens, spans


def _mre_record(tokens: list[str], head, tail, image_file: str, relation: str) -> dict:
    return {
        "token": tokens,
        "h": {"name": head[0], "pos": [head[1], head[2]]},
        "t": {"name": tail[0], "pos": [tail[1], tail[2]]},
        "img_id": image_file,
        "relation": relation,
    }


def build_mnre(rng: random.Random, root: Path, styles: dict[str, SceneStyle | TextureStyle] = MRE_STYLES) -> None:
    (root / "txt").mkdir(parents=True, exist_ok=True)
    (root / "mnre_rel2id.json").write_text(json.dumps({r: i for i, r in enumerate(MNRE_RELATIONS)}) + "\n")
    for split in SPLITS:
        num_groups, num_plain = MRE_SIZES[split]
        image_split = IMAGE_SPLIT_NAMES[split]
        sentences, seen = [], set()  # (tokens, [(head, tail, relation)], Picture)
        for _ in range(num_groups):
            head_kind, tail_kind, relations, frames = rng.choice(AMBIGUOUS_MRE_GROUPS)
            kinds = {"H": head_kind, "T": tail_kind}
            tokens, spans = draw_unique(seen, _relation_sentence, rng, frames, kinds)
            for relation in relations:
                sentences.append(
                    (tokens, [(spans["H"], spans["T"], relation)], cue_picture(rng, styles.get(relation)))
                )
        while num_plain > 0:
            frame, pairs = rng.choice(MRE_FRAMES)
            tokens, spans = draw_unique(seen, _relation_sentence, rng, [frame], {})
            pairs = rng.sample(pairs, k=min(len(pairs), num_plain, rng.randint(1, len(pairs))))
            num_plain -= len(pairs)
            relations = [relation for _, _, relation in pairs]
            congruent = [relation for relation in relations if relation in styles]
            records = [(spans[h], spans[t], relation) for h, t, relation in pairs]
            sentences.append((tokens, records, irrelevant_picture(rng, styles, congruent)))
        rng.shuffle(sentences)

        lines, crop_map = [], {}
        for number, (tokens, records, picture) in enumerate(sentences):
            image_file = f"sample_{image_split}_{number:04d}.jpg"
            crops = write_picture(
                rng, picture, root / "img_org" / image_split / image_file,
                root / "img_vg" / image_split / "crops", image_file.removesuffix(".jpg"),
            )  # fmt: skip
            for head, tail, relation in records:
                if crops:
                    crop_map[len(lines)] = crops  # MNRE's crop dicts are keyed by the sample's line index
                lines.append(repr(_mre_record(tokens, head, tail, image_file, relation)))
        (root / "txt" / f"mnre_{image_split}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        torch.save(crop_map, root / "txt" / f"mre_{MNRE_DICT_SPLIT_NAMES[split]}_dict.pth")


def build(output_dir: str | Path, seed: int = DEFAULT_SEED, cues: str = "color") -> None:
    """Write `twitter/`, `mnre/` and `gmner/` under `output_dir`, deterministically from `seed`; `cues` (a key of `CUES`) says
    what decides the image-decided labels."""
    if cues not in CUES:
        raise ValueError(f"cues must be one of {sorted(CUES)}, got {cues!r}")
    ner_styles, mre_styles = CUES[cues]
    output_dir = Path(output_dir)
    build_twitter(random.Random(seed), output_dir / "twitter", ner_styles)
    build_mnre(random.Random(seed + 1), output_dir / "mnre", mre_styles)
    build_gmner(random.Random(seed + 2), output_dir / "gmner")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default=str(SAMPLE_DIR), help="defaults to the package's sample_data folder")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument(
        "--cues",
        choices=sorted(CUES),
        default="color",
        help="what decides the image-decided labels: colors and shapes (the bundled sets) or textures alone",
    )
    args = parser.parse_args(argv)
    build(args.output_dir, args.seed, args.cues)


if __name__ == "__main__":
    main()
