"""Importing the package is enough: Auto classes and pipelines know HVPNeT."""

import subprocess
import sys
import textwrap


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
