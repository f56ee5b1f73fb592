# Two entry points: `make test` (set up a virtual environment, run the tests) and the tools below.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: requirements.txt requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	$(PY) -m pip install -q --no-deps panopticapi-lite
	touch $@

.PHONY: setup test flops
setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q tests

# GFLOPs of the reference models at the papers' sizes.
flops: setup
	$(PY) evaluate.py flops --config configs/coco/m2f_r50.yaml --size 800 1088
	$(PY) evaluate.py flops --config configs/coco/m2f_swin_t.yaml --size 800 1088
	$(PY) evaluate.py flops --config configs/cityscapes/m2f_r50.yaml --size 1024 2048
	$(PY) evaluate.py flops --config configs/cityscapes/m2f_swin_t.yaml --size 1024 2048
