"""
A published model works from its Hub id: trained tiny NER and RE models are laid out in a local Hub cache
(`models--org--name/refs/main` and `snapshots/<commit>/`) and loaded offline by repo id in fresh processes, once
where `hvpnet_hf` cannot be imported (model, processor and pipeline from the repository's code) and once with it.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from modeling_utils import TOKENIZERS, tiny_family_task_model, tiny_task_model
from PIL import Image
from transformers.dynamic_module_utils import get_imports

from hvpnet_hf import HVPNetProcessor, HVPNetTrainer, HVPNetTrainingArguments
from hvpnet_hf.pipelines import MultimodalNerPipeline, MultimodalRePipeline

NER_REPO, RE_REPO = "org/hvpnet-ner", "org/hvpnet-mnre"
# Packages the saved code must not need: machine B has only transformers (with huggingface_hub, which needs yaml),
# timm, torch, pillow and pytorch-crf.
BLOCKED = ("hvpnet_hf", "datasets", "seqeval", "evaluate")
# What a machine with transformers, timm and pytorch-crf has: those, and what they install (torch, numpy, pillow,
# torchvision).
# huggingface_hub: transformers depends on it, and the configuration is a strict dataclass of its `dataclasses`.
CODE_DEPENDENCIES = {"torch", "transformers", "huggingface_hub", "timm", "PIL", "torchcrf", "numpy", "torchvision"}
BLOCKER = textwrap.dedent(
    f"""
    import sys

    class BlockPackages:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {BLOCKED!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
            return None

    sys.meta_path.insert(0, BlockPackages())
    """
)


def tiny_trained_model(task: str, steps: int, image: str) -> tuple[torch.nn.Module, HVPNetProcessor]:
    """A tiny HVPNeT (2 layers of width 32, test_resnet) trained for a few steps on two examples."""
    model, processor = tiny_task_model(task)
    words = [["Kevin", "Durant", "enters", "Oracle", "Arena"], ["Alice", "met", "Bob", "in", "Paris"]]
    if task == "ner":
        batch = processor([image, None], words, word_labels=[[1, 2, 0, 5, 6], [1, 0, 1, 0, 3]])
    else:
        spans = {"head": [{"start": 0, "end": 1}] * 2, "tail": [{"start": 2, "end": 3}, {"start": 4, "end": 5}]}
        batch = processor([image, None], words, **spans, labels=[1, 2])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    return model.eval(), processor


def add_snapshot(cache, repo_id: str, folder, commit: str, ref: str | None = "main") -> None:
    """Puts `folder` into the Hub cache as revision `commit` of `repo_id` (and points `ref` at it)."""
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo_dir / "snapshots" / commit)
    if ref is not None:
        (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A Hub cache with a trained NER and RE model (an earlier, less trained RE revision too) and their outputs."""
    root = tmp_path_factory.mktemp("hub")
    image, crop = root / "tweet.png", root / "crop.png"
    Image.new("RGB", (48, 32), (200, 40, 30)).save(image)
    Image.new("L", (20, 20), 90).save(crop)
    ner_example = {"text": "Kevin Durant enters Oracle Arena", "image": str(image), "objects": [str(crop)]}
    re_example = {
        "words": ["Alice", "met", "Bob", "in", "Paris"], "head": (0, 1), "tail": (2, 3),
        "image": str(image), "objects": [str(crop)],
    }  # fmt: skip
    expected, commits = {}, {"main": "a" * 40, "earlier": "b" * 40}
    for task, repo_id, pipeline_class, example in (
        ("ner", NER_REPO, MultimodalNerPipeline, ner_example),
        ("re", RE_REPO, MultimodalRePipeline, re_example),
    ):
        for revision, steps in (("main", 5), ("earlier", 1)):
            if task == "ner" and revision == "earlier":
                continue
            model, processor = tiny_trained_model(task, steps, str(image))
            pipe = pipeline_class(model=model, processor=processor)
            folder = root / f"{task}-{revision}"
            pipe.save_pretrained(folder)
            add_snapshot(root / "cache", repo_id, folder, commits[revision], "main" if revision == "main" else None)
            words = example["words"] if task == "re" else example["text"].split()
            spans = {"head": {"start": 0, "end": 1}, "tail": {"start": 2, "end": 3}} if task == "re" else {}
            inputs = processor(example["image"], words, example["objects"], **spans)
            with torch.no_grad():
                output = model(**inputs)
            expected[f"{task}-{revision}"] = {
                "inputs": dict(inputs),
                "logits": output.logits,
                "tags": model.decode(output.logits, inputs["word_start_mask"]) if task == "ner" else None,
                "pipeline": pipe(example, top_k=3) if task == "re" else pipe(example),
            }
    torch.save(expected, root / "expected.pt")
    return {"root": root, "commits": commits, "ner_example": ner_example, "re_example": re_example}


def run_offline(hub, script: str, block: bool) -> dict:
    """Runs `script` in a fresh process on the Hub cache, offline, from a folder without the project on the path."""
    environment = {
        key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "HF_HOME", "HF_HUB_CACHE")
    }
    environment.update(
        HF_HUB_CACHE=str(hub["root"] / "cache"),
        HF_MODULES_CACHE=str(hub["root"] / f"modules-{block}"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_NO_ADVISORY_WARNINGS="1",
    )
    if not block:
        environment["PYTHONPATH"] = os.environ.get("PYTHONPATH", "")
    preamble = BLOCKER if block else ""
    result = subprocess.run(
        [sys.executable, "-c", preamble + textwrap.dedent(script)],
        capture_output=True,
        text=True,
        env=environment,
        cwd=hub["root"],
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_models_processors_and_pipelines_load_by_repo_id_without_hvpnet_hf(hub):
    script = f"""
    import json
    import torch
    from transformers import (
        AutoModel, AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoProcessor, pipeline,
    )

    expected = torch.load("expected.pt", weights_only=False)
    report = {{}}
    for task, repo_id, auto_class, example in (
        ("ner", {NER_REPO!r}, AutoModelForTokenClassification, {hub["ner_example"]!r}),
        ("re", {RE_REPO!r}, AutoModelForSequenceClassification, {hub["re_example"]!r}),
    ):
        case = expected[task + "-main"]
        model = auto_class.from_pretrained(repo_id, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(repo_id, trust_remote_code=True, token="hf_not_used_offline")
        words = example["words"] if task == "re" else example["text"].split()
        spans = {{"head": {{"start": 0, "end": 1}}, "tail": {{"start": 2, "end": 3}}}} if task == "re" else {{}}
        inputs = processor(example["image"], words, example["objects"], **spans)
        same_inputs = sorted(inputs) == sorted(case["inputs"]) and all(
            torch.equal(inputs[name], case["inputs"][name]) for name in inputs
        )
        with torch.no_grad():
            output = model(**inputs)
        pipe = pipeline(model=repo_id, trust_remote_code=True)
        result = pipe(example, top_k=3) if task == "re" else pipe(example)
        report[task] = {{
            "classes": [type(model).__module__, type(processor).__module__, type(pipe).__module__],
            "pipeline_class": type(pipe).__name__,
            "same_inputs": same_inputs,
            "logits_difference": (output.logits - case["logits"]).abs().max().item(),
            "same_tags": task == "re" or torch.equal(model.decode(output.logits, inputs["word_start_mask"]), case["tags"]),
            "pipeline": result,
        }}
    report["re_base_model"] = type(AutoModel.from_pretrained({RE_REPO!r}, trust_remote_code=True)).__name__
    earlier = AutoModelForSequenceClassification.from_pretrained(
        {RE_REPO!r}, revision={hub["commits"]["earlier"]!r}, trust_remote_code=True
    ).eval()
    with torch.no_grad():
        earlier_logits = earlier(**expected["re-earlier"]["inputs"]).logits
    report["earlier_difference"] = (earlier_logits - expected["re-earlier"]["logits"]).abs().max().item()
    report["earlier_differs_from_main"] = not torch.allclose(
        expected["re-earlier"]["logits"], expected["re-main"]["logits"], atol=1e-3
    )
    import sys
    report["imported"] = sorted(name for name in sys.modules if name.split(".")[0] in {BLOCKED!r})
    print(json.dumps(report))
    """
    report = run_offline(hub, script, block=True)
    expected = torch.load(hub["root"] / "expected.pt", weights_only=False)
    assert report["imported"] == []
    for task, pipeline_name in (("ner", "MultimodalNerPipeline"), ("re", "MultimodalRePipeline")):
        case = expected[f"{task}-main"]
        assert all(module.startswith("transformers_modules.") for module in report[task]["classes"]), report[task]
        assert report[task]["pipeline_class"] == pipeline_name
        assert report[task]["same_inputs"]  # the remote processor gives the very same tensors
        # 1e-5: the same weights and inputs on the same machine; only the order of float operations may differ.
        assert report[task]["logits_difference"] <= 1e-5
        assert report[task]["same_tags"]
        assert_same_pipeline_output(report[task]["pipeline"], case["pipeline"])
    assert report["re_base_model"] == "HVPNetModel"
    assert report["earlier_differs_from_main"] and report["earlier_difference"] <= 1e-5  # revision= picks it


def test_saved_code_imports_only_what_remote_code_may_need(hub):
    snapshot = hub["root"] / "cache" / f"models--{NER_REPO.replace('/', '--')}" / "snapshots" / hub["commits"]["main"]
    code_files = sorted(path.name for path in snapshot.glob("*.py"))
    assert code_files == [
        "configuration_hvpnet.py", "frozen_backbone.py", "image_processing_hvpnet.py", "modeling_hvpnet.py",
        "object_detection.py", "original_visual_prefix.py", "pipelines.py", "processing_hvpnet.py", "tasks.py",
        "vision_backbone.py",
    ]  # fmt: skip
    for name in code_files:
        third_party = {module for module in get_imports(snapshot / name) if module not in sys.stdlib_module_names}
        assert third_party <= CODE_DEPENDENCIES, (name, third_party)


def test_registered_pipelines_load_by_repo_id_with_hvpnet_hf(hub):
    script = f"""
    import json
    import hvpnet_hf
    from transformers import AutoProcessor, pipeline

    ner = pipeline("multimodal-ner", model={NER_REPO!r})
    relation = pipeline("multimodal-re", model={RE_REPO!r})
    print(json.dumps({{
        "classes": [type(ner).__module__, type(relation).__module__, type(AutoProcessor.from_pretrained({NER_REPO!r})).__module__],
        "ner": ner({hub["ner_example"]!r}),
        "re": relation({hub["re_example"]!r}, top_k=3),
    }}))
    """
    report = run_offline(hub, script, block=False)
    expected = torch.load(hub["root"] / "expected.pt", weights_only=False)
    assert all(module.startswith("hvpnet_hf.") for module in report["classes"]), report["classes"]
    assert_same_pipeline_output(report["ner"], expected["ner-main"]["pipeline"])
    assert_same_pipeline_output(report["re"], expected["re-main"]["pipeline"])


def assert_same_pipeline_output(got: list[dict], expected: list[dict]) -> None:
    """The same entities or relations in the same order; scores within 1e-5 (float noise)."""
    assert len(got) == len(expected) and len(expected) > 0
    for got_item, expected_item in zip(got, expected, strict=True):
        assert {key: value for key, value in got_item.items() if key != "score"} == {
            key: value for key, value in expected_item.items() if key != "score"
        }
        assert got_item["score"] == pytest.approx(expected_item["score"], abs=1e-5)


def test_every_save_route_gives_a_folder_whose_pipeline_loads_without_hvpnet_hf(tmp_path):
    """`model.save_pretrained` + `processor.save_pretrained` (the README's Usage) and `HVPNetTrainer.save_model`
    (which `Trainer.push_to_hub` and the checkpoints go through, as `push_to_hub` goes through `save_pretrained`)
    both record the pipeline and copy its code: `pipeline(model=folder, trust_remote_code=True)` then builds it
    offline where `hvpnet_hf` cannot be imported, with the outputs of the pipeline built in this process."""
    image = tmp_path / "tweet.png"
    Image.new("RGB", (48, 32), (200, 40, 30)).save(image)
    examples = {
        "ner": {"text": "Kevin Durant enters Oracle Arena", "image": str(image)},
        "re": {"words": ["Alice", "met", "Bob", "in", "Paris"], "head": (0, 1), "tail": (2, 3), "image": str(image)},
    }
    ner_model, ner_processor = tiny_task_model("ner")
    re_model, re_processor = tiny_task_model("re")
    ner_model.save_pretrained(tmp_path / "ner-save_pretrained")
    ner_processor.save_pretrained(tmp_path / "ner-save_pretrained")
    re_model.save_pretrained(tmp_path / "re-save_pretrained")
    re_processor.save_pretrained(tmp_path / "re-save_pretrained")
    arguments = HVPNetTrainingArguments(output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True)
    HVPNetTrainer(model=ner_model, args=arguments, processing_class=ner_processor).save_model(tmp_path / "ner-trainer")
    expected = {
        "ner-save_pretrained": MultimodalNerPipeline(model=ner_model, processor=ner_processor)(examples["ner"]),
        "re-save_pretrained": MultimodalRePipeline(model=re_model, processor=re_processor)(examples["re"], top_k=2),
    }
    expected["ner-trainer"] = expected["ner-save_pretrained"]
    script = f"""
    import json
    import sys
    from transformers import pipeline

    report = {{}}
    for name in {sorted(expected)!r}:
        pipe = pipeline(model=name, trust_remote_code=True)
        example = {examples!r}[name.split("-")[0]]
        output = pipe(example, top_k=2) if name.startswith("re") else pipe(example)
        report[name] = {{"module": type(pipe).__module__, "output": output}}
    report["imported"] = sorted(module for module in sys.modules if module.split(".")[0] in {BLOCKED!r})
    print(json.dumps(report))
    """
    report = run_offline({"root": tmp_path}, script, block=True)
    assert report.pop("imported") == []
    assert sorted(report) == sorted(expected)
    for name, result in report.items():
        assert result["module"].startswith("transformers_modules."), result["module"]
        assert_same_pipeline_output(result["output"], expected[name])


FAMILY_REPOS = {
    "ner": ("org/hvpnet-roberta-ner", "roberta", "byte-level-bpe"),
    "re": ("org/hvpnet-xlmr-mnre", "xlm-roberta", "unigram"),
}


@pytest.fixture(scope="module")
def family_hub(tmp_path_factory):
    """A Hub cache with a RoBERTa-based NER model and an XLM-R-based RE model (byte-level BPE and Unigram tokenizers
    without token type ids, RE markers `<e1> </e1> <e2> </e2>`), each trained a few steps, with their outputs."""
    root = tmp_path_factory.mktemp("family_hub")
    image = root / "tweet.png"
    Image.new("RGB", (48, 32), (30, 140, 200)).save(image)
    examples = {
        "ner": {"text": "Kevin Durant enters Oracle Arena", "image": str(image)},
        "re": {"words": ["Alice", "met", "Bob", "in", "Paris"], "head": (0, 1), "tail": (2, 3), "image": str(image)},
    }
    expected = {}
    for task, (repo_id, model_type, tokenizer_family) in FAMILY_REPOS.items():
        model, processor = tiny_family_task_model(task, model_type, TOKENIZERS[tokenizer_family]())
        words = [["Kevin", "Durant", "enters", "Oracle", "Arena"], ["Alice", "met", "Bob", "in", "Paris"]]
        if task == "ner":
            batch = processor([str(image), None], words, word_labels=[[1, 2, 0, 5, 6], [1, 0, 1, 0, 3]])
        else:
            spans = {"head": [{"start": 0, "end": 1}] * 2, "tail": [{"start": 2, "end": 3}, {"start": 4, "end": 5}]}
            batch = processor([str(image), None], words, **spans, labels=[1, 2])
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(5):
            optimizer.zero_grad()
            model.train()(**batch).loss.backward()
            optimizer.step()
        pipe = (MultimodalNerPipeline if task == "ner" else MultimodalRePipeline)(
            model=model.eval(), processor=processor
        )
        pipe.save_pretrained(root / task)
        add_snapshot(root / "cache", repo_id, root / task, "c" * 40)
        expected[task] = pipe(examples[task], top_k=3) if task == "re" else pipe(examples[task])
    return {"root": root, "examples": examples, "expected": expected}


def test_roberta_and_xlm_r_models_load_by_repo_id_without_hvpnet_hf(family_hub):
    script = f"""
    import json
    from transformers import AutoConfig, AutoModel, AutoProcessor, pipeline

    report = {{}}
    for task, repo_id in (("ner", {FAMILY_REPOS["ner"][0]!r}), ("re", {FAMILY_REPOS["re"][0]!r})):
        example = {family_hub["examples"]!r}[task]
        processor = AutoProcessor.from_pretrained(repo_id, trust_remote_code=True)
        pipe = pipeline(model=repo_id, trust_remote_code=True)
        report[task] = {{
            "text_config": type(AutoConfig.from_pretrained(repo_id, trust_remote_code=True).text_config).__name__,
            "text_model": type(AutoModel.from_pretrained(repo_id, trust_remote_code=True).text_model).__name__,
            "tokenizer": type(processor.tokenizer).__name__,
            "entity_markers": processor.entity_markers,
            "model_input_names": processor.model_input_names,
            "pipeline": pipe(example, top_k=3) if task == "re" else pipe(example),
        }}
    import sys
    report["imported"] = sorted(name for name in sys.modules if name.split(".")[0] in {BLOCKED!r})
    print(json.dumps(report))
    """
    report = run_offline(family_hub, script, block=True)
    assert report["imported"] == []
    assert report["ner"]["text_config"] == "RobertaConfig" and report["ner"]["text_model"] == "RobertaModel"
    assert report["re"]["text_config"] == "XLMRobertaConfig" and report["re"]["text_model"] == "XLMRobertaModel"
    assert report["ner"]["tokenizer"] == "RobertaTokenizer" and report["re"]["tokenizer"] == "XLMRobertaTokenizer"
    assert report["ner"]["entity_markers"] is None
    assert report["re"]["entity_markers"] == ["<e1>", "</e1>", "<e2>", "</e2>"]
    for task in ("ner", "re"):
        assert "token_type_ids" not in report[task]["model_input_names"]
        assert_same_pipeline_output(report[task]["pipeline"], family_hub["expected"][task])
