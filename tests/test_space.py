"""The Space writer: the files a gradio Space needs to serve the web app for a model, and their upload."""

import runpy
from pathlib import Path

import gradio
from huggingface_hub import SpaceCard

import hvpnet_hf.app
from hvpnet_hf.space import push_space_to_hub, write_space


def test_space_serves_the_app_for_the_model(tmp_path, tiny_ner_dir, monkeypatch):
    space = write_space(tmp_path / "space", model_id=tiny_ner_dir, package="hvpnet_hf[app] @ git+https://x.test/h")
    assert sorted(path.name for path in space.iterdir()) == ["README.md", "app.py", "requirements.txt"]
    assert (space / "requirements.txt").read_text() == "hvpnet_hf[app] @ git+https://x.test/h\n"
    card = SpaceCard.load(space / "README.md")
    assert (card.data.sdk, card.data.sdk_version, card.data.app_file) == ("gradio", gradio.__version__, "app.py")
    assert card.data.models == [tiny_ner_dir]
    # Running the Space's app.py builds the app for the model and launches it (recorded here instead of served).
    launched = []
    monkeypatch.setattr(hvpnet_hf.app, "launch", lambda app, **kwargs: launched.append(app))
    runpy.run_path(str(space / "app.py"))
    (app,) = launched
    assert app.model_name == tiny_ner_dir and app.classifier is not None and app.load_error is None


def test_space_requires_this_version_by_default(tmp_path):
    write_space(tmp_path, model_id="someone/hvpnet")
    assert (tmp_path / "requirements.txt").read_text() == "hvpnet_hf[app]==0.1.0\n"


class RecordingHubApi:
    """Stands in for `HfApi`: records the calls and what the uploaded folder held."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, folder_path, **kwargs):
        files = {path.name: path.read_text() for path in sorted(Path(folder_path).iterdir())}
        self.calls.append(("upload_folder", kwargs.pop("repo_id"), {**kwargs, "files": files}))
        return "https://hub.example/commit/2"


def test_push_creates_a_gradio_space_and_uploads_its_files():
    api = RecordingHubApi()
    url = push_space_to_hub("someone/hvpnet-demo", model_id="someone/hvpnet", private=True, api=api)
    (_, repo_id, create_kwargs), (_, upload_id, upload_kwargs) = api.calls
    assert url == "https://hub.example/commit/2" and repo_id == upload_id == "someone/hvpnet-demo"
    assert create_kwargs == {"repo_type": "space", "space_sdk": "gradio", "private": True, "exist_ok": True}
    assert upload_kwargs["repo_type"] == "space"
    assert sorted(upload_kwargs["files"]) == ["README.md", "app.py", "requirements.txt"]
    assert "HVPNetApp('someone/hvpnet')" in upload_kwargs["files"]["app.py"]
