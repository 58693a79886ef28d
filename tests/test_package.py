"""Importing the package is enough: Auto classes and pipelines know HVPNeT."""

import ast
import graphlib
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path


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


def test_wheel_carries_templates_sample_data_and_metrics(tmp_path):
    root = Path(__file__).resolve().parents[1]
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)]
    result = subprocess.run([*build, str(root)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = tmp_path.glob("hvpnet_hf-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        "hvpnet_hf/model_cards/hvpnet_ner.md",
        "hvpnet_hf/model_cards/hvpnet_re.md",
        "hvpnet_hf/metrics/ner_seqeval.py",
        "hvpnet_hf/metrics/re_micro_f1.py",
        "hvpnet_hf/sample_data/twitter/train.txt",
        "hvpnet_hf/sample_data/twitter/twitter_train_dict.pth",
        "hvpnet_hf/sample_data/mnre/mnre_rel2id.json",
    }
    assert expected <= names, sorted(expected - names)
    sample_images = [name for name in names if name.startswith("hvpnet_hf/sample_data/") and name.endswith(".jpg")]
    assert len(sample_images) > 1000


PACKAGE = Path(__file__).resolve().parents[1] / "hvpnet_hf"
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
