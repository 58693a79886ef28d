"""How every analysis reports: scores in percent as the paper prints them, and a Markdown table with its data."""

import json
from pathlib import Path
from typing import Any


def format_score(mean: float, std: float | None = None) -> str:
    """A score in percent as the paper prints it, with its standard deviation when there is one."""
    return f"{100 * mean:.2f}" if std is None else f"{100 * mean:.2f} ± {100 * std:.2f}"


def write_report(output_dir: Path, name: str, markdown: str, data: Any) -> None:
    """Writes `<name>.md` and `<name>.json` into `output_dir` and prints the Markdown."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"{name}.md").write_text(markdown + "\n", encoding="utf-8")
    (output_dir / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    print(f"\n{markdown}\n\nwritten: {output_dir / name}.md, {output_dir / name}.json")
