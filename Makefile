# kiln: `make demo` and `make test` set up .venv from scratch and run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
JOBS ?= auto

.PHONY: demo test test-fast test-heavy lint venv clean conformance fuzz-inputs runtime-wheel cpp

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kiln demo

# One BLAS thread per xdist worker: OpenBLAS threads spin-waiting on shared cores slow matmuls 5-10x.
test: $(STAMP)
	OPENBLAS_NUM_THREADS=1 $(PY) -m pytest -q -n $(JOBS) --dist loadgroup -m "not heavy"

# Tests that take minutes of compile time each (the quantized transformer layer from ORT's quantizer).
test-heavy: $(STAMP)
	OPENBLAS_NUM_THREADS=1 $(PY) -m pytest -q -n $(JOBS) -m heavy

test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(JOBS) -m "not slow and not heavy"

# ONNX's node conformance suite through the compiled path (1,700+ small models; not part of `make test`).
conformance: $(STAMP)
	OPENBLAS_NUM_THREADS=1 $(VENV)/bin/kiln conformance --path compiled --jobs 2 --table --show wrong,crashed
	OPENBLAS_NUM_THREADS=1 $(VENV)/bin/kiln conformance --path interp --jobs 2 --show wrong,crashed

# Malformed ONNX files, artifacts, calibration files and run inputs: 10,000 cases per kind (~15 min;
# not part of `make test`, which runs 100 per kind). Exit 1 when anything but a result or a kiln.Error came out.
fuzz-inputs: $(STAMP)
	OPENBLAS_NUM_THREADS=1 $(VENV)/bin/kiln fuzz --level inputs --iterations 10000 --seed 0 --out out/fuzz-inputs

# The slim runtime distribution (kiln-runtime, import name kiln_runtime): runtime/ + libtvm_runtime.so
# from the pinned apache-tvm + the prebuilt thread pool -> dist/kiln_runtime-<ver>-py3-none-<plat>.whl
runtime-wheel: $(STAMP)
	$(PY) scripts/build_runtime_wheel.py --out dist

# kiln's C++ runtime (cpp/): build/cpp/libkiln_runtime.so and the example build/cpp/kiln_example
# (CMake + the system compiler; tvm-ffi headers and the TVM libraries from .venv, nothing downloaded).
cpp: $(STAMP)
	cmake -S cpp -B build/cpp -DCMAKE_BUILD_TYPE=Release
	cmake --build build/cpp -j 2

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
