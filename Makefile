# niix: the two commands a fresh machine needs are `make run` and `make test`.
# See README.md.

CARGO ?= cargo
DATA ?= data
MODELS ?= fixtures/models
LISTEN ?= 127.0.0.1:50051
ORT_LIB := .niix/onnxruntime/libonnxruntime.so.1.31.1

.PHONY: run test build release lint fmt sample onnxruntime pyenv clean-data bench models

## Fetch what is missing, build, and serve on the embedded store.
run: onnxruntime release
	mkdir -p $(DATA) $(MODELS)
	ORT_DYLIB_PATH="$(CURDIR)/$(ORT_LIB)" ./target/release/niix serve --listen $(LISTEN) --data $(DATA) --models $(MODELS)

## Build and run every test, plus format and lint checks (what CI runs).
test: onnxruntime pyenv
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	ORT_DYLIB_PATH="$(CURDIR)/$(ORT_LIB)" $(CARGO) test --workspace

## Python with pydicom and numpy: DICOS tests check niix against an independent DICOM reader.
PYENV := .niix/venv/.pydicom-ready
pyenv: $(PYENV)
$(PYENV):
	python3 -m venv .niix/venv
	.niix/venv/bin/pip install --quiet "pydicom==3.0.2" "numpy>=1.26,<3"
	touch $(PYENV)

## The ONNX Runtime shared library, from the PyPI wheel (see scripts/).
onnxruntime: $(ORT_LIB)
$(ORT_LIB):
	./scripts/fetch-onnxruntime.sh

build:
	$(CARGO) build --workspace

release:
	$(CARGO) build --release -p niix-server

lint:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

## A small dual-energy demo scan (two 16-bit PNGs) for the walk-through.
sample: fixtures/samples/demo.high.png
fixtures/samples/demo.high.png: fixtures/samples/make_samples.py
	python3 fixtures/samples/make_samples.py

clean-data:
	rm -rf $(DATA)

## Benchmarks (see benches/README.md); prints each stage's time.
bench: onnxruntime
	$(CARGO) bench -p niix-benches

## Rebuild the shipped ONNX models from their script (needs the `onnx` Python package).
models:
	python3 -m venv .niix/venv
	.niix/venv/bin/pip install --quiet "onnx==1.23.2"
	.niix/venv/bin/python fixtures/models/build_models.py
