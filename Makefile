# Two entry points: `make demo` (the main job on the built-in synthetic data) and `make test`;
# both set up the virtual environment first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: requirements.txt requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	$(PY) -m pip install -q --no-deps panopticapi-lite
	touch $@

.PHONY: setup demo test flops
setup: $(VENV)/.installed

# Generate the synthetic dataset, train a tiny Mask2Former and its PRO-SCALE (1,1,1) twin on CPU
# (each evaluates itself at the end), and write the report: runs/demo/report.md, with pictures
# under runs/demo/*/eval/vis/.
demo: setup
	$(PY) data.py synth --out datasets/synthetic
	$(PY) train.py --config configs/demo/m2f_tiny.yaml --out runs/demo/m2f
	$(PY) train.py --config configs/demo/proscale_tiny.yaml --out runs/demo/proscale
	$(PY) evaluate.py report "M2F (tiny)=runs/demo/m2f/eval" "PRO-SCALE (1,1,1) (tiny)=runs/demo/proscale/eval" \
		--out runs/demo/report.md

test: setup
	$(PY) -m pytest -q tests

# GFLOPs of the reference models at the papers' sizes.
flops: setup
	$(PY) evaluate.py flops --config configs/coco/m2f_r50.yaml --size 800 1088
	$(PY) evaluate.py flops --config configs/coco/m2f_swin_t.yaml --size 800 1088
	$(PY) evaluate.py flops --config configs/cityscapes/m2f_r50.yaml --size 1024 2048
	$(PY) evaluate.py flops --config configs/cityscapes/m2f_swin_t.yaml --size 1024 2048
