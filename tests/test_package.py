"""The package as installed: importing it registers HVPNeT, its wheel stands alone, its imports point one way."""

import ast
import graphlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest


def test_import_registers_auto_classes_and_pipelines():
    script = textwrap.dedent(
        """
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoModelForTokenClassification
        from transformers.pipelines import PIPELINE_REGISTRY

        import hvpnet_hf

        config = AutoConfig.for_model("hvpnet", text_config={"hidden_size": 32, "num_hidden_layers": 1,
                                      "num_attention_heads": 2, "intermediate_size": 8}, vision_backbone="test_resnet")
        assert type(AutoModelForTokenClassification.from_config(config)) is hvpnet_hf.HVPNetForTokenClassification
        assert type(AutoModelForSequenceClassification.from_config(config)) is hvpnet_hf.HVPNetForSequenceClassification
        tasks = PIPELINE_REGISTRY.get_supported_tasks()
        assert {"multimodal-ner", "multimodal-re"} <= set(tasks), tasks
        assert set(hvpnet_hf.__all__) <= set(dir(hvpnet_hf))
        print("registered")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "registered" in result.stdout


def test_model_side_import_leaves_the_data_and_training_libraries_unloaded():
    # Using a model or a pipeline needs neither datasets nor evaluate nor Trainer; each name of the package still
    # resolves, loading its module on first use.
    script = textwrap.dedent(
        """
        import sys

        import hvpnet_hf

        heavy = {"datasets", "evaluate", "pandas", "pyarrow", "transformers.trainer"}
        assert not heavy & set(sys.modules), heavy & set(sys.modules)
        for name in hvpnet_hf.__all__:
            assert getattr(hvpnet_hf, name) is not None, name
        assert {"datasets", "transformers.trainer"} <= set(sys.modules)
        from hvpnet_hf.loading import load_mner_dataset
        assert hvpnet_hf.load_mner_dataset is load_mner_dataset
        try:
            hvpnet_hf.no_such_name
        except AttributeError as error:
            assert "no_such_name" in str(error)
        else:
            raise AssertionError("an unknown name resolved")
        print("lazy")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "lazy" in result.stdout


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Built from a copy of the sources without the build outputs, as from a fresh clone: setuptools builds in the
    # source folder, and would also pack what a stale `build/` there still holds (a module since moved or removed).
    source = tmp_path_factory.mktemp("source") / "hvpnet_hf"
    outputs = shutil.ignore_patterns(".*", "__pycache__", "build", "dist", "*.egg-info", "outputs", "runs", "wandb")
    shutil.copytree(ROOT, source, ignore=outputs)
    folder = tmp_path_factory.mktemp("wheel")
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(folder)]
    result = subprocess.run([*build, str(source)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = folder.glob("hvpnet_hf-*.whl")
    return wheel


def test_wheel_carries_templates_sample_data_and_metrics_but_no_development_tools(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        "hvpnet_hf/model_cards/hvpnet_ner.md",
        "hvpnet_hf/model_cards/hvpnet_re.md",
        "hvpnet_hf/metrics/ner_seqeval.py",
        "hvpnet_hf/metrics/re_micro_f1.py",
        "hvpnet_hf/sample_data/twitter/train.txt",
        "hvpnet_hf/sample_data/twitter/twitter_train_dict.pth",
        "hvpnet_hf/sample_data/mnre/txt/mre_dev_dict.pth",
        "hvpnet_hf/sample_data/mnre/mnre_rel2id.json",
        "hvpnet_hf/analysis/gates.py",
    }
    assert expected <= names, sorted(expected - names)
    sample_images = [name for name in names if name.startswith("hvpnet_hf/sample_data/") and name.endswith(".jpg")]
    assert len(sample_images) > 1000
    # The drivers that train and the generator of the sample sets are scripts of the repository, not modules of the
    # package: of the sample data, only the files and their layout ship.
    assert not [
        name for name in names if name.startswith(("examples/", "tools/")) or name.endswith(("demo.py", "runs.py"))
    ]
    sample_modules = [name for name in names if name.startswith("hvpnet_hf/sample_data/") and name.endswith(".py")]
    assert sample_modules == ["hvpnet_hf/sample_data/__init__.py"]


def test_installed_wheel_runs_its_commands_without_the_source_tree(wheel, tiny_ner_dir, tmp_path):
    # A fresh venv that reaches this environment's dependencies through a path line of a .pth file. Such a line only
    # adds the folder to sys.path: the .pth files in it are not run, so the editable install of hvpnet_hf there (an
    # import hook a .pth file starts) is not active, and only the wheel provides hvpnet_hf.
    # Nor does PYTHONPATH reach into the source tree, for pip (which would take it for an installed hvpnet_hf) or later.
    environment = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    environment.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    (site_packages,) = venv.glob("lib/python*/site-packages")
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index"]
    result = subprocess.run([*install, str(wheel)], env=environment, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    # Only now: pip would take the editable install it sees through the line for the one it is asked to install.
    (site_packages / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    outside = tmp_path / "elsewhere"  # the working folder of every command: not the repository
    outside.mkdir()

    def run(*command: str) -> str:
        finished = subprocess.run(command, cwd=outside, env=environment, capture_output=True, text=True)
        assert finished.returncode == 0, finished.stdout[-2000:] + finished.stderr[-3000:]
        return finished.stdout

    where = run(str(python), "-c", "import sys, hvpnet_hf; print(hvpnet_hf.__file__); print(sys.meta_path)")
    installed, finders = where.splitlines()
    assert Path(installed).is_relative_to(site_packages) and "editable" not in finders, where

    run(
        str(python),
        "-m",
        "hvpnet_hf.analysis.gates",
        "--model",
        tiny_ner_dir,
        "--max_samples",
        "8",
        "--output_dir",
        "gates",
    )
    gates = json.loads((outside / "gates" / "gates.json").read_text())
    assert gates["gates"]["global image"]["images"] > 0 and (outside / "gates" / "gates.png").is_file()

    # The bundled sample data of the installed package as input: every tweet gets one sentence of predictions.
    twitter = site_packages / "hvpnet_hf" / "sample_data" / "twitter"
    predict = ["--model", tiny_ner_dir, "--input", str(twitter / "test.txt"), "--image_dir", str(twitter / "images")]
    run(str(venv / "bin" / "hvpnet-predict"), *predict, "--output", "predictions.txt")
    sentences = (outside / "predictions.txt").read_text(encoding="utf-8").strip("\n").split("\n\n")
    assert len(sentences) == (twitter / "test.txt").read_text(encoding="utf-8").count("IMGID:")

    usage = run(str(venv / "bin" / "hvpnet-extract-objects"), "--help")
    assert usage.startswith("usage:") and "--input INPUT" in usage
    assert run(str(venv / "bin" / "hvpnet-pack-dataset"), "--help").startswith("usage: hvpnet-pack-dataset")


PACKAGE = ROOT / "hvpnet_hf"
# The data path, each module importing only modules before it: the image processor and the processor come first
# because they are saved next to a model and may import nothing of the package but each other.
DATA_PATH = ["image_processing_hvpnet", "processing_hvpnet", "loading", "collating"]


def package_imports() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its source (module level, functions, TYPE_CHECKING)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                if node.module:
                    imported.add(f"{base}.{node.module}")
                else:  # from . import name
                    imported |= {f"{base}.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module.startswith("hvpnet_hf"):
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names if alias.name.startswith("hvpnet_hf")}
        graph[module] = imported - {module}
    return graph


def test_package_imports_point_one_way():
    graph = package_imports()
    assert graph["hvpnet_hf.collating"] >= {"hvpnet_hf.processing_hvpnet"}  # the parser sees relative imports
    list(graphlib.TopologicalSorter(graph).static_order())  # raises CycleError naming the cycle
    for position, name in enumerate(DATA_PATH):
        later = {f"hvpnet_hf.{module}" for module in DATA_PATH[position + 1 :]}
        assert not graph[f"hvpnet_hf.{name}"] & later, name
