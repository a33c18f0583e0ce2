# The otm image: the control plane (`otm server`) and the instance image for the reference agent
# (`otm shim`, which starts `otm-reference-agent` from beside itself).
#
#   podman build -f deploy/images/otm.Dockerfile -t localhost/otm:0.1.0 .
#
# scripts/build-images builds it (and assembles the same image without any registry when the
# base images cannot be pulled). Pin the base images by digest in production
# (--build-arg RUST_IMAGE=...@sha256:...).
ARG RUST_IMAGE=docker.io/library/rust:1.95.0-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY crates crates
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p otm --bin otm --bin otm-shim --bin otm-reference-agent \
 && mkdir -p /out/bin /out/var/lib/otm/instance /out/var/lib/otm/data \
 && cp target/release/otm target/release/otm-shim target/release/otm-reference-agent /out/bin/

# glibc, libgcc, CA certificates, /etc/passwd with `nonroot` (65532), no shell.
FROM ${RUNTIME_IMAGE}
COPY --from=build /out/bin/ /usr/local/bin/
# The instance directory (`otm shim --dir`) and the server's data directory. The root filesystem
# is read-only in a pod: mount an emptyDir (or a volume) on each.
COPY --from=build --chown=65532:65532 /out/var/lib/otm /var/lib/otm
USER 65532:65532
WORKDIR /var/lib/otm
ENV HOME=/var/lib/otm \
    OTM_DATA_DIR=/var/lib/otm/data \
    PATH=/usr/local/bin:/usr/bin:/bin
ENTRYPOINT ["/usr/local/bin/otm"]
CMD ["--help"]
