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

.PHONY: setup demo demo-full test flops native bench-msda bench
setup: $(VENV)/.installed

# The main job, on CPU, in 5 to 7 minutes on 2 idle cores: generate the synthetic dataset; train a
# tiny Mask2Former and its PRO-SCALE (1,1,1) twin side by side (one thread each; each evaluates
# itself at the end); run ECO-M2F's three steps on the Mask2Former (Step A: weighted stochastic
# depth; Step B: per-image PQ at every exit; Step C: gates for two β) and sweep every exit and
# gate; write runs/demo/report.md (the same val images in every row, speed as ratios measured in
# one process, the papers' claims beside the run's) with pictures; predict one image.
# `make demo-full` is the longer reference run (runs/demo-full). THREADS: torch threads of the
# steps that run alone (2 suits an idle 2-core machine; on a busy one 1 is faster).
DEMO ?= runs/demo
DEMO_TRAIN ?= 160
DEMO_VAL ?= 40
DEMO_ITERS ?= 200
DEMO_STEP_A ?= 80
THREADS ?= 2
BETAS ?= 0.0 0.02
schedule = train.iterations=$(1) train.steps=[$$(($(1) * 9 / 10)),$$(($(1) * 19 / 20))] train.checkpoint_every=100
ECO := configs/demo/eco_tiny.yaml
demo: setup
	@mkdir -p $(DEMO)
	@echo "step 1/8: the synthetic dataset, $(DEMO_TRAIN) train and $(DEMO_VAL) val images (datasets/synthetic)"
	@$(PY) synthetic.py --out datasets/synthetic --train $(DEMO_TRAIN) --val $(DEMO_VAL)
	@echo "step 2/8: train Mask2Former and PRO-SCALE (1,1,1), $(DEMO_ITERS) iterations, side by side (logs: $(DEMO)/m2f.log, $(DEMO)/proscale.log)"
	@OMP_NUM_THREADS=1 $(PY) train.py --config configs/demo/m2f_tiny.yaml --out $(DEMO)/m2f --overwrite \
		$(call schedule,$(DEMO_ITERS)) > $(DEMO)/m2f.log 2>&1 & m=$$!; \
	OMP_NUM_THREADS=1 $(PY) train.py --config configs/demo/proscale_tiny.yaml --out $(DEMO)/proscale --overwrite \
		$(call schedule,$(DEMO_ITERS)) > $(DEMO)/proscale.log 2>&1 & p=$$!; \
	wait $$m; a=$$?; wait $$p; b=$$?; grep -H "^iteration" $(DEMO)/m2f.log $(DEMO)/proscale.log; \
	if [ $$a != 0 ] || [ $$b != 0 ]; then tail -n 5 $(DEMO)/m2f.log $(DEMO)/proscale.log; exit 1; fi
	@echo "step 3/8: ECO-M2F Step A, weighted stochastic depth from the Mask2Former, $(DEMO_STEP_A) iterations"
	@OMP_NUM_THREADS=$(THREADS) $(PY) train.py --config $(ECO) --out $(DEMO)/eco --overwrite \
		--init $(DEMO)/m2f/model_final.pt train.evaluate=false $(call schedule,$(DEMO_STEP_A))
	@echo "step 4/8: ECO-M2F Step B, per-image PQ at every exit over the training images"
	@rm -f $(DEMO)/eco/derived.jsonl*  # the Step A weights are new
	@OMP_NUM_THREADS=$(THREADS) $(PY) derive.py --weights $(DEMO)/eco/model_final.pt --out $(DEMO)/eco/derived.jsonl
	@echo "step 5/8: ECO-M2F Step C, a gate for each β of $(BETAS)"
	@for beta in $(BETAS); do OMP_NUM_THREADS=$(THREADS) $(PY) gate.py --weights $(DEMO)/eco/model_final.pt \
		--derived $(DEMO)/eco/derived.jsonl --beta $$beta --out $(DEMO)/eco/beta$$beta.pt --overwrite || exit 1; done
	@echo "step 6/8: evaluate every exit and gate on the val images"
	@OMP_NUM_THREADS=$(THREADS) $(PY) evaluate.py sweep --weights $(DEMO)/eco/model_final.pt \
		--gates $(foreach b,$(BETAS),$(DEMO)/eco/beta$(b).pt) --out $(DEMO)/eco/sweep --overwrite --fps-images 0
	@echo "step 7/8: the report, with speed ratios timed in one process ($(DEMO)/report.md)"
	@$(PY) evaluate.py report "M2F=$(DEMO)/m2f/eval" "PRO-SCALE (1,1,1)=$(DEMO)/proscale/eval" \
		$(foreach k,1 2 3,"ECO-M2F exit $(k)=$(DEMO)/eco/sweep/exit_$(k)") \
		$(foreach b,$(BETAS),"ECO-M2F gate, β=$(b)=$(DEMO)/eco/sweep/gate_beta$(b)") \
		--derived $(DEMO)/eco/derived.jsonl --image $(DEMO)/eco/sweep/sweep.png --out $(DEMO)/report.md
	@echo "step 8/8: predict one val image with the ECO-M2F gate ($(DEMO)/predict)"
	@OMP_NUM_THREADS=$(THREADS) $(PY) evaluate.py predict --weights $(DEMO)/eco/model_final.pt \
		--gate $(DEMO)/eco/beta$(lastword $(BETAS)).pt --input datasets/synthetic/val/images/000001.png \
		--out $(DEMO)/predict --overwrite
	@echo "done: $(DEMO)/report.md, pictures in $(DEMO)/predict/overlay/"

# The longer reference run of the demo (its report is in the README).
demo-full:
	$(MAKE) demo DEMO=runs/demo-full DEMO_TRAIN=200 DEMO_VAL=50 DEMO_ITERS=600 DEMO_STEP_A=200

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

# Time against FLOPs: the encoders against M2F, post-processing, ours against HF, the training step
# (CPU, 1 thread, interleaved ratios; about 10 minutes; `bench/speed.py --quick` for a smoke run).
bench: setup
	$(PY) bench/speed.py
