"""Fixtures several test modules share: random tiny models saved as model folders, which tests only read."""

import pytest
from modeling_utils import tiny_model_folder


@pytest.fixture(scope="session")
def tiny_ner_dir(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("tiny_ner")
    tiny_model_folder(folder, "ner")
    return str(folder)


@pytest.fixture(scope="session")
def tiny_re_dir(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("tiny_re")
    tiny_model_folder(folder, "re")
    return str(folder)
