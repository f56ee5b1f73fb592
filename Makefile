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

.PHONY: setup demo test flops native bench-msda
setup: $(VENV)/.installed

# The main job, on CPU: generate the synthetic dataset; train a tiny Mask2Former and its PRO-SCALE
# (1,1,1) twin (each evaluates itself at the end); run ECO-M2F's three steps on the Mask2Former
# (Step A: weighted stochastic depth; Step B: per-image PQ at every exit; Step C: gates for two
# β) and sweep every exit and gate; write runs/demo/report.md with the pictures.
DEMO := runs/demo
demo: setup
	$(PY) synthetic.py --out datasets/synthetic
	$(PY) train.py --config configs/demo/m2f_tiny.yaml --out $(DEMO)/m2f --overwrite
	$(PY) train.py --config configs/demo/proscale_tiny.yaml --out $(DEMO)/proscale --overwrite
	$(PY) train.py --config configs/demo/eco_tiny.yaml --out $(DEMO)/eco --overwrite --init $(DEMO)/m2f/model_final.pt train.evaluate=false
	rm -f $(DEMO)/eco/derived.jsonl*  # Step B again: the Step A weights are new
	$(PY) derive.py --config configs/demo/eco_tiny.yaml --weights $(DEMO)/eco/model_final.pt --out $(DEMO)/eco/derived.jsonl
	for beta in 0.0 0.02; do $(PY) gate.py --config configs/demo/eco_tiny.yaml --weights $(DEMO)/eco/model_final.pt \
		--derived $(DEMO)/eco/derived.jsonl --beta $$beta --out $(DEMO)/eco/beta$$beta.pt --overwrite || exit 1; done
	$(PY) evaluate.py sweep --config configs/demo/eco_tiny.yaml --weights $(DEMO)/eco/model_final.pt \
		--gates $(DEMO)/eco/beta0.0.pt $(DEMO)/eco/beta0.02.pt --out $(DEMO)/eco/sweep --overwrite
	$(PY) evaluate.py report "M2F=$(DEMO)/m2f/eval" "PRO-SCALE (1,1,1)=$(DEMO)/proscale/eval" \
		"ECO-M2F exit 1=$(DEMO)/eco/sweep/exit_1" "ECO-M2F exit 2=$(DEMO)/eco/sweep/exit_2" \
		"ECO-M2F exit 3=$(DEMO)/eco/sweep/exit_3" "ECO-M2F gate, β=0=$(DEMO)/eco/sweep/gate_beta0.0" \
		"ECO-M2F gate, β=0.02=$(DEMO)/eco/sweep/gate_beta0.02" --image $(DEMO)/eco/sweep/sweep.png \
		--out $(DEMO)/report.md

test: setup
	$(PY) -m pytest -q tests

# GFLOPs of the reference models at the papers' sizes.
flops: setup
	$(PY) evaluate.py flops --config configs/coco/m2f_r50.yaml --size 800 1088
	$(PY) evaluate.py flops --config configs/coco/m2f_swin_t.yaml --size 800 1088
	$(PY) evaluate.py flops --config configs/cityscapes/m2f_r50.yaml --size 1024 2048
	$(PY) evaluate.py flops --config configs/cityscapes/m2f_swin_t.yaml --size 1024 2048

# The native deformable attention (csrc/), built ahead of first use into torch's extension cache:
# the CPU build, and the CUDA build wherever nvcc is (without a GPU it compiles and loads, as a check).
native: setup
	$(PY) -c "import msda; msda.build_native('cpu')"
	if command -v nvcc >/dev/null 2>&1; then $(PY) -c "import msda, torch; torch.version.cuda and msda.build_native('cuda')"; fi

# Native vs torch deformable attention, 1 CPU thread (bench/msda_bench.py --device cuda on a GPU).
bench-msda: native
	$(PY) bench/msda_bench.py
