# The OpenClaw instance image: `otm shim` supervising one OpenClaw gateway, with Node 24 and
# OpenClaw installed by scripts/install-openclaw (which pins both versions) in /opt/openclaw.
# It also holds `otm-reference-agent`: a warm pod runs this image before anyone knows which
# profile its tenant will have, so it must serve every profile.
# The orchestrator passes /opt/openclaw/bin/openclaw as the launcher (--openclaw-prefix
# /opt/openclaw).
#
#   podman build -f deploy/images/openclaw.Dockerfile -t localhost/otm-openclaw:0.1.0 .
#
# Pin the base images by digest in production (--build-arg ..._IMAGE=...@sha256:...).
ARG RUST_IMAGE=docker.io/library/rust:1.95.0-bookworm
ARG NODE_IMAGE=docker.io/library/node:24.22.3-bookworm-slim
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY crates crates
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p otm --bin otm --bin otm-shim --bin otm-reference-agent \
 && mkdir -p /out/bin /out/var/lib/otm/instance \
 && cp target/release/otm target/release/otm-shim target/release/otm-reference-agent /out/bin/

# npm only runs the installer; the Node that OpenClaw runs on is the one it installs.
FROM ${NODE_IMAGE} AS openclaw
COPY scripts/install-openclaw /usr/local/bin/install-openclaw
# Its launcher finds itself with readlink and dirname; the runtime stage has no coreutils, so
# the launcher is written again with absolute paths.
RUN install-openclaw --prefix /opt/openclaw \
 && rm -rf /opt/openclaw/lib/node_modules/.cache \
 && entry="$(sed -n 's|.*"\$here/\.\./\(lib/node_modules/openclaw/[^"]*\)".*|\1|p' /opt/openclaw/bin/openclaw)" \
 && test -n "$entry" \
 && printf '#!/bin/sh\nexec /opt/openclaw/bin/node /opt/openclaw/%s "$@"\n' "$entry" >/opt/openclaw/bin/openclaw

# glibc, libstdc++ (for Node), CA certificates, /etc/passwd with `nonroot` (65532).
FROM ${RUNTIME_IMAGE}
# `otm shim` finds the reference agent beside itself.
COPY --from=build /out/bin/ /usr/local/bin/
COPY --from=openclaw /opt/openclaw /opt/openclaw
# The `openclaw` launcher is a shell script: dash (needs only libc) as /bin/sh.
COPY --from=openclaw /bin/dash /bin/sh
COPY --from=build --chown=65532:65532 /out/var/lib/otm /var/lib/otm
USER 65532:65532
WORKDIR /var/lib/otm
ENV HOME=/var/lib/otm \
    PATH=/opt/openclaw/bin:/usr/local/bin:/usr/bin:/bin \
    OTM_OPENCLAW_PREFIX=/opt/openclaw
ENTRYPOINT ["/usr/local/bin/otm"]
CMD ["shim", "--help"]
