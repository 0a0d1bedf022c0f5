# syntax=docker/dockerfile:1
# The connector (`sri serve`) as an image, built from this repository:
#   docker build -f infra/connector.Dockerfile -t sri-connector:local .
# (infra/compose.yaml builds it the same way.) Base images are pinned by tag; pin digests in
# your registry mirror if you need bit-for-bit rebuilds.

# --- build ---------------------------------------------------------------------------------
# The workspace's rust-version is 1.94.1; rust:1.95 is the toolchain it is tested with.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# Only what cargo needs: the workspace manifests and the three members.
COPY Cargo.toml Cargo.lock ./
COPY connector connector
COPY bootstrap bootstrap
COPY tests tests
# `sri` is the connector; `bootstrap` ships beside it for the local backend. The Lambda backend
# zips a bootstrap for the functions' architecture into every function (`bin/bootstrap`; the
# layer's `/opt/bootstrap` is used instead when SRI_BOOTSTRAP_LAYER_ARN is set, but packaging
# still checks and ships one): both are cross-built here with cargo-lambda (zig links them
# against the glibc of Lambda's Amazon Linux, not this image's).
# Cache mounts keep the registry and target/ between builds; the binaries are copied out
# because the target/ mount is not part of the image.
COPY tests/tooling/requirements-tools.txt /tmp/requirements-tools.txt
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/cargo-lambda \
 && /opt/cargo-lambda/bin/pip install --no-cache-dir --disable-pip-version-check -r /tmp/requirements-tools.txt
ENV PATH=/opt/cargo-lambda/bin:$PATH
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --locked --release -p sri-connector --bin sri -p sri-bootstrap --bin bootstrap \
 && install -D -m 0755 target/release/sri /out/sri \
 && install -D -m 0755 target/release/bootstrap /out/bootstrap \
 && for arch in arm64 x86_64; do \
      flag=$([ "$arch" = arm64 ] && echo --arm64 || echo --x86-64); \
      cargo lambda build --locked --profile dist -p sri-bootstrap --no-default-features --bin bootstrap "$flag" \
        --lambda-dir "target/lambda/$arch" --flatten bootstrap \
      && install -D -m 0755 "target/lambda/$arch/bootstrap" "/out/lambda/$arch/bootstrap"; \
    done

# --- run -----------------------------------------------------------------------------------
FROM debian:bookworm-slim
# ca-certificates: TLS to AWS and the daemon (rustls with the system roots).
# python3 + uv: `sri` installs plugin dependencies for the function's platform and Python
# (cross-platform wheels: uv/pip --python-platform, no emulation needed).
# tini: PID 1 that reaps. `sri` spawns bootstraps and they spawn plugins; an orphan whose parent
# died is re-parented to PID 1, and only a reaping init keeps it from staying a zombie.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates python3 python3-venv tini \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/sri-tools \
 && /opt/sri-tools/bin/pip install --no-cache-dir --disable-pip-version-check uv==0.13.9 \
 && useradd --system --uid 10001 --home-dir /var/lib/sri --create-home sri
COPY --from=build /out/sri /out/bootstrap /usr/local/bin/
COPY --from=build /out/lambda /usr/local/lib/sri/lambda
ENV PATH=/opt/sri-tools/bin:$PATH \
    SRI_BOOTSTRAP_ARM64=/usr/local/lib/sri/lambda/arm64/bootstrap \
    SRI_BOOTSTRAP_X86_64=/usr/local/lib/sri/lambda/x86_64/bootstrap \
    SRI_LISTEN=0.0.0.0:5004 \
    SRI_DATA_DIR=/var/lib/sri/data
USER sri
WORKDIR /var/lib/sri
EXPOSE 5004
# No curl in the image: bash's /dev/tcp asks GET /healthz and looks for a 200.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/5004 && printf 'GET /healthz HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && head -n1 <&3 | grep -q ' 200 '"]
# The stop signal goes to sri alone: it drains its streams, then stops its functions in order.
ENTRYPOINT ["/usr/bin/tini", "--", "sri"]
CMD ["serve"]
