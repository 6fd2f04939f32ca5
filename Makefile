# `make setup` creates .venv (idempotent: a second run only checks the stamp file).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-done
TORCH  := torch==2.14.1 torchvision==0.29.1

.PHONY: setup test demo clean-demo mutation

setup: $(STAMP)

$(STAMP): setup.py requirements.txt tools/install_detectron2.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) tools/install_detectron2.py
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

# The whole test suite (CPU, tiny models; 619 tests in 17 min 58 s on 2 cores, fresh clone, 2026-11-30). Two pytest workers with one intra-op thread each
# (tests/conftest.py) keep both cores busy; a test file stays on one worker (--dist loadfile)
# so its module-scoped trained model is built once.
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest tests -q -ra --durations=25 -n $(TEST_WORKERS) --dist loadfile

# Train the quickstart Mask R-CNN on the built-in `shapes` dataset, evaluate it, and write
# visualisations of its predictions on shapes_val to $(DEMO_OUT)/vis. The config sets SEED, so
# every run on the same machine prints the same AP (`make demo DEMO_OUT=dir` for a fresh folder).
DEMO_OUT ?= output/demo
demo: setup
	@start=$$(date +%s); \
	$(PY) train_net.py --config-file configs/quickstart/mask_rcnn_R_18_FPN_shapes.yaml \
		OUTPUT_DIR $(DEMO_OUT) && \
	echo "make demo: trained and evaluated in $$(( $$(date +%s) - start )) s" && \
	$(PY) tools/demo.py --config-file configs/quickstart/mask_rcnn_R_18_FPN_shapes.yaml \
		--input "$$($(PY) -c 'import projects; print(projects.shapes_image_glob("shapes_val"))')" \
		--output $(DEMO_OUT)/vis --max-images 8 --confidence-threshold 0.3 --opts MODEL.WEIGHTS $(DEMO_OUT)/model_final.pth

# Mutation testing of one method package's core modules (not part of `make test`; scope in
# tests/mutation/<package>.cfg, results in tests/MUTATION.md), e.g. `make mutation PKG=rdsnet`.
PKG ?=
mutation: setup
	PYTHON=$(abspath $(PY)) bash tools/mutation.sh $(PKG)
