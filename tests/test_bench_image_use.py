"""The image-use benchmark's runs train at the prefix learning rate their setting names, whatever the shipped
settings file sets."""

import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_image_use  # noqa: E402


@pytest.mark.parametrize(("prefix", "expected"), [("none", None), ("masked", None), ("3e-3", 3e-3), ("1e-3", 1e-3)])
def test_a_run_trains_the_prefix_at_the_rate_its_setting_names(tmp_path, prefix, expected):
    setting = bench_image_use.parse_setting(f"ner/sample/frozen/{prefix}")
    argv = bench_image_use.script_argv(setting, 42, tmp_path / "run", tmp_path)
    settings = yaml.safe_load(Path(argv[0]).read_text())
    assert settings.get("prefix_learning_rate") == expected
    shipped = yaml.safe_load((bench_image_use.REPOSITORY / "examples/configs/demo_mner.yaml").read_text())
    assert {key: value for key, value in settings.items() if key != "prefix_learning_rate"} == {
        key: value for key, value in shipped.items() if key != "prefix_learning_rate"
    }
    assert ("--mask_images" in argv) == (prefix == "masked")
