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

.PHONY: help setup python tools build test demo bench lint lint-infra fmt clean lambda-bootstrap

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

bench: setup $(LWA_STAMP) ## benchmarks (release + dist builds, then ~70 s bootstrap + ~30 s connector, ~30 s intake + packaging, ~30 s relay runs); figures go to BENCHMARKS.md
	$(CARGO) build --release --locked -p sri-bootstrap
	$(CARGO) build --profile dist --locked -p sri-bootstrap --no-default-features
	$(CARGO) run --release --locked -p sri-tests --example bench
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

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
	rm -rf $(VENV)
