"""
The bundled multimodal sample sets (Twitter-style NER, MNRE-style RE and Twitter-GMNER-style grounded NER) and where
their files are. Each set is laid
out as its published release, so the loaders read it as they read the real data. The repository's
`tools/build_sample_data.py` generates them.
"""

from pathlib import Path
from typing import Any

from ..grounding_data import candidate_boxes_file
from ..loading import SPLIT_ALIASES, find_release_layout

SAMPLE_DIR = Path(__file__).parent
# Per task, inside SAMPLE_DIR: the folder of the split files, of the pictures and of the object crops (both laid out
# per split as in the releases, except the Twitter pictures, which are one folder), and the relation ids; for grounded
# NER the box files and the folder of the crop maps and candidate boxes (as `hvpnet-extract-objects` writes them).
SAMPLE_LAYOUT = {
    "ner": {"data_dir": "twitter", "image_dir": "twitter/images", "object_dir": "twitter/aux_images"},
    "re": {
        "data_dir": "mnre/txt",
        "image_dir": "mnre/img_org",
        "object_dir": "mnre/img_vg",
        "rel2id": "mnre/mnre_rel2id.json",
    },
    "gmner": {
        "data_dir": "gmner/txt",
        "xml_dir": "gmner/xml",
        "image_dir": "gmner/images",
        "object_dir": "gmner/objects",
        "object_map_dir": "gmner/objects",
    },
}


def sample_paths(task: str) -> dict[str, str]:
    """The folders (and for RE the relation ids file) of the sample set of `task` (a key of `SAMPLE_LAYOUT`), as full
    paths."""
    if task not in SAMPLE_LAYOUT:
        raise ValueError(f"task must be one of {sorted(SAMPLE_LAYOUT)}, got {task!r}")
    return {name: str(SAMPLE_DIR / path) for name, path in SAMPLE_LAYOUT[task].items()}


def sample_sources(task: str) -> dict[str, Any]:
    """Keyword arguments of `load_mner_dataset` / `load_mre_dataset` / `load_gmner_dataset` that read all three splits
    of the sample set of `task`, for grounded NER with every image's candidate boxes."""
    paths = sample_paths(task)
    object_dir, map_dir = paths.pop("object_dir"), paths.pop("object_map_dir", paths["data_dir"])
    layout = find_release_layout(paths.pop("image_dir"), object_dir, map_dir)
    if task == "gmner":
        layout["candidate_boxes"] = {
            split: str(candidate_boxes_file(map_dir, aliases[0])) for split, aliases in SPLIT_ALIASES.items()
        }
    return {**paths, **layout}
