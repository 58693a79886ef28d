"""
A Hugging Face Space that serves the web app (`app.py`) for a published HVPNeT model, so people can try it in the
browser (the Hub shows no inference widget for a custom pipeline):

```python
from hvpnet_hf.space import push_space_to_hub, write_space

write_space("outputs/space", model_id="someone/hvpnet-twitter2015")  # to look at or upload by hand
push_space_to_hub("someone/hvpnet-twitter2015-demo", model_id="someone/hvpnet-twitter2015")
```

A Space is three files: `app.py` (serves `hvpnet_hf.app` for the model), `requirements.txt` (this package with its
`app` extra, which brings gradio) and `README.md` (the Space's settings: the gradio SDK and its version, the app
file, the model it uses). `package` is the pip requirement the Space installs this package from: by default this
version from PyPI; a Git URL (`hvpnet_hf[app] @ git+https://...`) or a wheel's URL works too.
"""

import tempfile
from importlib.metadata import version
from pathlib import Path

from huggingface_hub import HfApi, SpaceCard, SpaceCardData

APP_TEMPLATE = '''"""Serves the HVPNeT web app for {model_id} (see hvpnet_hf/app.py)."""

from hvpnet_hf.app import HVPNetApp, launch

launch(HVPNetApp({model_id!r}))
'''


def write_space(space_dir: str | Path, model_id: str, package: str | None = None) -> Path:
    """Writes the Space files (`app.py`, `requirements.txt`, `README.md`) serving `model_id` to `space_dir`;
    `package` defaults to this version of the package with its `app` extra."""
    import gradio

    package = package or f"hvpnet_hf[app]=={version('hvpnet_hf')}"
    space_dir = Path(space_dir)
    space_dir.mkdir(parents=True, exist_ok=True)
    (space_dir / "app.py").write_text(APP_TEMPLATE.format(model_id=model_id))
    (space_dir / "requirements.txt").write_text(f"{package}\n")
    card_data = SpaceCardData(
        title=f"HVPNeT: {model_id.rstrip('/').split('/')[-1]}",
        sdk="gradio",
        sdk_version=gradio.__version__,
        app_file="app.py",
        models=[model_id],
        license="apache-2.0",
        tags=["hvpnet", "multimodal"],
    )
    text = (
        f"Try [{model_id}](https://huggingface.co/{model_id}), an HVPNeT model (Chen et al., NAACL 2022 Findings): "
        "give a tweet and its image, and see the entities (or the relation) it finds, the object crops it read, "
        "the gate weights of its visual prefix, and what changes when the image is masked."
    )
    SpaceCard(f"---\n{card_data.to_yaml()}\n---\n\n{text}\n").save(space_dir / "README.md")
    return space_dir


def push_space_to_hub(
    space_id: str,
    model_id: str,
    package: str | None = None,
    token: str | None = None,
    private: bool | None = None,
    api: HfApi | None = None,
) -> str:
    """Creates (or updates) the gradio Space `space_id` serving `model_id` (see `write_space`); returns the commit
    URL."""
    api = api or HfApi(token=token)
    api.create_repo(space_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        write_space(folder, model_id, package)
        commit = api.upload_folder(
            repo_id=space_id,
            repo_type="space",
            folder_path=folder,
            commit_message=f"Serve the HVPNeT web app for {model_id}",
        )
    return str(commit)


__all__ = ["push_space_to_hub", "write_space"]
