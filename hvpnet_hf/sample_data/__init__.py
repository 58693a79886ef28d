"""
The bundled multimodal sample sets (Twitter-style NER and MNRE-style RE) and where their files are. Each set is laid
out as its published release, so the loaders read it as they read the real data. The repository's
`tools/build_sample_data.py` generates them.
"""

from pathlib import Path
from typing import Any

from ..loading import find_release_layout

SAMPLE_DIR = Path(__file__).parent
# Per task, inside SAMPLE_DIR: the folder of the split files, of the pictures and of the object crops (both laid out
# per split as in the releases, except the Twitter pictures, which are one folder), and the relation ids.
SAMPLE_LAYOUT = {
    "ner": {"data_dir": "twitter", "image_dir": "twitter/images", "object_dir": "twitter/aux_images"},
    "re": {
        "data_dir": "mnre/txt",
        "image_dir": "mnre/img_org",
        "object_dir": "mnre/img_vg",
        "rel2id": "mnre/mnre_rel2id.json",
    },
}


def sample_paths(task: str) -> dict[str, str]:
    """The folders (and for RE the relation ids file) of the sample set of `task` ("ner" or "re"), as full paths."""
    if task not in SAMPLE_LAYOUT:
        raise ValueError(f"task must be one of {sorted(SAMPLE_LAYOUT)}, got {task!r}")
    return {name: str(SAMPLE_DIR / path) for name, path in SAMPLE_LAYOUT[task].items()}


def sample_sources(task: str) -> dict[str, Any]:
    """Keyword arguments of `load_mner_dataset` / `load_mre_dataset` that read all three splits of the sample set."""
    paths = sample_paths(task)
    layout = find_release_layout(paths.pop("image_dir"), paths.pop("object_dir"), paths["data_dir"])
    return {**paths, **layout}
