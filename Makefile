# The two commands a newcomer types: `make demo` and `make test`. Every target installs what it
# needs itself (Python venvs, cargo-lambda) so a fresh machine with Rust + Python works.

SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV := .venv
TOOLS := $(VENV)/tools
CARGO_LAMBDA := $(TOOLS)/bin/cargo-lambda
# The benchmark's peer, AWS Lambda Web Adapter, built from crates.io (never vendored): the
# newest release there (`cargo info lambda_web_adapter`), pre-releases included.
LWA_VERSION := 1.0.0-rc1
LWA_STAMP := $(TOOLS)/lwa/.installed-$(LWA_VERSION)
CARGO ?= cargo
UV := $(TOOLS)/bin/uv
# moto_server (the AWS control plane stand-in) and botocore, in a venv of their own.
MOTO := $(VENV)/moto/bin/moto_server
# cfn-lint, aws-sam-translator and checkov: the offline lint of infra/ (tests/e2e/infra.rs).
INFRA_LINT := $(VENV)/infra/bin/checkov

# Fuzzing (FUZZING.md): cargo-fuzz, pinned, in the worktree's own tool dir.
CARGO_FUZZ_VERSION := 0.13.1
CARGO_FUZZ := $(CURDIR)/.tools/bin/cargo-fuzz
FUZZ_TARGETS := sse_decoder gateway_ndjson signing envelope launch_multipart intake requirements \
	manifest function_url_event invoke_stream_prelude eventstream_frames plugin_lines relay_claim
FUZZ_SECONDS ?= 180
FUZZ_CI_SECONDS ?= 6
# CI fuzzes from a fixed seed: the same mutations every run, so a red build is a regression, not luck.
FUZZ_CI_SEED ?= 1
# Stable Rust: cargo-fuzz's -Z flags need RUSTC_BOOTSTRAP. No sanitizer by default: the
# parsers are safe Rust, and ASan halves the executions on two cores (FUZZ_SANITIZER=address).
FUZZ_SANITIZER ?= none
FUZZ_BUILD := RUSTC_BOOTSTRAP=1 $(CARGO_FUZZ) build -s $(FUZZ_SANITIZER)
FUZZ_RUN := RUSTC_BOOTSTRAP=1 $(CARGO_FUZZ) run -s $(FUZZ_SANITIZER)

.PHONY: help setup python tools build test demo bench lint lint-infra fmt clean lambda-bootstrap fuzz fuzz-ci fuzz-seeds

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 12

setup: python tools ## Python venvs (SDK 0.10 on 3.12, 0.7.4 on 3.11), cargo-lambda, uv, moto, infra linters

python:
	@tests/tooling/setup-venvs.sh

tools: $(CARGO_LAMBDA) $(MOTO) $(INFRA_LINT)

$(CARGO_LAMBDA): tests/tooling/requirements-tools.txt
	python3 -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check -r $<
	touch $@

$(MOTO): tests/tooling/requirements-moto.txt | $(CARGO_LAMBDA)
	rm -rf $(VENV)/moto
	python3 -m venv $(VENV)/moto
	$(UV) pip install --quiet --python $(VENV)/moto/bin/python -r $<
	touch $@

$(INFRA_LINT): tests/tooling/requirements-infra.txt | $(CARGO_LAMBDA)
	rm -rf $(VENV)/infra
	python3 -m venv $(VENV)/infra
	$(UV) pip install --quiet --python $(VENV)/infra/bin/python -r $<
	touch $@

build: ## build every crate (debug) once; the tests reuse the binaries
	$(CARGO) build --workspace --all-targets --locked

# Connector tests that are about the local backend's own venvs and installers (pip, uv spy,
# operator index, functions/ dir): not run again on the emulator backend.
EMULATOR_SKIP := --skip dependenc --skip operators_index --skip reused_only_for_the_same_checksum

test: setup build ## every test: unit, protocol vectors, end-to-end against the real SDK and cargo lambda
	$(CARGO) test --workspace --locked
	SRI_TEST_BACKEND=emulator $(CARGO) test --locked -p sri-tests --test connector -- $(EMULATOR_SKIP)

BACKEND ?= local
demo: tools ## sri serve (BACKEND=local|emulator): launch the sample plugin, stream a tool's output
	$(CARGO) build --locked -p sri-connector -p sri-bootstrap
	SRI_BACKEND=$(BACKEND) tests/tooling/demo.sh

bench: setup $(LWA_STAMP) ## benchmarks (release + dist builds, then ~70 s bootstrap + ~2 min concurrency + ~30 s connector, ~30 s intake + packaging, ~30 s relay runs); figures go to BENCHMARKS.md
	$(CARGO) build --release --locked -p sri-bootstrap
	$(CARGO) build --profile dist --locked -p sri-bootstrap --no-default-features
	$(CARGO) run --release --locked -p sri-tests --example bench
	$(CARGO) run --release --locked -p sri-tests --example bench_concurrency
	$(CARGO) run --release --locked -p sri-tests --example bench_connector
	$(CARGO) run --release --locked -p sri-tests --example bench_intake
	$(CARGO) build --locked -p sri-connector -p sri-bootstrap
	$(CARGO) run --release --locked -p sri-tests --example bench_emulator
	$(CARGO) build --release --locked -p sri-connector
	$(CARGO) run --release --locked -p sri-tests --example bench_sandbox
	$(CARGO) run --release --locked -p sri-tests --example bench_relay
	$(MAKE) lambda-bootstrap
	SRI_BOOTSTRAP_ARM64=$(CURDIR)/target/lambda/arm64/bootstrap SRI_BOOTSTRAP_X86_64=$(CURDIR)/target/lambda/x86_64/bootstrap \
	  $(CARGO) run --release --locked -p sri-tests --example bench_packaging

lambda-bootstrap: tools ## the bootstrap for arm64 and x86_64 (dist profile) into target/lambda/<arch>/bootstrap, what `sri package` ships
	PATH="$(CURDIR)/$(TOOLS)/bin:$$PATH" $(CARGO_LAMBDA) lambda build --profile dist --locked -p sri-bootstrap --no-default-features --bin bootstrap --arm64 --lambda-dir target/lambda/arm64 --flatten bootstrap
	PATH="$(CURDIR)/$(TOOLS)/bin:$$PATH" $(CARGO_LAMBDA) lambda build --profile dist --locked -p sri-bootstrap --no-default-features --bin bootstrap --x86-64 --lambda-dir target/lambda/x86_64 --flatten bootstrap

$(LWA_STAMP):
	$(CARGO) install --locked lambda_web_adapter --version $(LWA_VERSION) --root $(TOOLS)/lwa
	touch $@

lint: ## formatting and clippy, as CI wants them
	$(CARGO) fmt --all -- --check
	$(CARGO) fmt --manifest-path fuzz/Cargo.toml -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

# The same checks as tests/e2e/infra.rs, by hand: cfn-lint on the SAM file and on its offline
# transform, checkov on both, and the canary (which must fail, with the expected rule ids).
lint-infra: $(INFRA_LINT) ## cfn-lint + checkov on infra/template.yaml (offline SAM transform)
	@out=$$(mktemp -d) && trap 'rm -rf "$$out"' EXIT && \
	$(VENV)/infra/bin/python tests/tooling/sam_translate.py infra/template.yaml $$out/template.json && \
	$(VENV)/infra/bin/cfn-lint infra/template.yaml $$out/template.json && \
	$(VENV)/infra/bin/checkov --skip-download --quiet --compact --framework cloudformation \
		-f infra/template.yaml -f $$out/template.json && \
	echo "infra/template.yaml: cfn-lint and checkov clean" && \
	$(VENV)/infra/bin/python tests/tooling/sam_translate.py infra/tests/canary.yaml $$out/canary.json && \
	{ $(VENV)/infra/bin/cfn-lint infra/tests/canary.yaml $$out/canary.json; \
	  $(VENV)/infra/bin/checkov --skip-download --quiet --compact --framework cloudformation \
		-f $$out/canary.json; } | grep -oE '\b(E3030|E3717|W3037|E6101|CKV_AWS_258)\b' | sort -u | \
	  { ids=$$(tr '\n' ' '); echo "canary trips: $$ids"; \
	    [ "$$ids" = "CKV_AWS_258 E3030 E3717 E6101 W3037 " ] || { echo "canary: expected all of CKV_AWS_258 E3030 E3717 E6101 W3037" >&2; exit 1; }; }

$(CARGO_FUZZ):
	$(CARGO) install --locked cargo-fuzz --version $(CARGO_FUZZ_VERSION) --root $(CURDIR)/.tools

fuzz-seeds: ## write the fuzz targets' seed corpora (fuzz/corpus/<target>) from code
	$(CARGO) run --locked -p sri-tests --example fuzz_seeds -- fuzz/corpus

fuzz: $(CARGO_FUZZ) fuzz-seeds ## run every fuzz target FUZZ_SECONDS (default 180) each; corpora grow in fuzz/corpus
	cd fuzz && $(FUZZ_BUILD)
	cd fuzz && for t in $(FUZZ_TARGETS); do \
	  mkdir -p corpus/$$t && \
	  $(FUZZ_RUN) $$t corpus/$$t -- -max_total_time=$(FUZZ_SECONDS) -timeout=10 -print_final_stats=1 || exit 1; \
	done

fuzz-ci: $(CARGO_FUZZ) fuzz-seeds ## every fuzz target FUZZ_CI_SECONDS (default 6) from its seeds; a crash fails
	cd fuzz && $(FUZZ_BUILD)
	cd fuzz && for t in $(FUZZ_TARGETS); do \
	  new=$$(mktemp -d) && mkdir -p corpus/$$t && \
	  $(FUZZ_RUN) $$t $$new corpus/$$t -- -max_total_time=$(FUZZ_CI_SECONDS) -seed=$(FUZZ_CI_SEED) -timeout=10 || exit 1; \
	  rm -rf $$new; \
	done

fmt:
	$(CARGO) fmt --all
	$(CARGO) fmt --manifest-path fuzz/Cargo.toml

clean:
	$(CARGO) clean
	rm -rf $(VENV)
