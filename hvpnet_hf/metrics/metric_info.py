"""What the package's `evaluate` modules tell `evaluate` about themselves; `evaluate.load` copies this file next to
the module that imports it."""

import datasets
import evaluate


def metric_info(
    description: str, inputs_description: str, citation: str, features: dict[str, datasets.Value | datasets.Sequence]
) -> evaluate.MetricInfo:
    """The `MetricInfo` of a metric module: its texts and the features of its `predictions` and `references`."""
    return evaluate.MetricInfo(
        description=description,
        citation=citation,
        inputs_description=inputs_description,
        features=datasets.Features(features),
    )
