# syntax=docker/dockerfile:1
# guestcred product images. Two targets from one build:
#   docker build --target controller -t guestcred-controller .
#   docker build --target shim       -t guestcred-shim .
# Only the product package is built (`-p guestcred`): the test world (`lab/`, the
# API-server emulator and guest lab) and the benchmarks are other workspace packages and
# never ship. The controller image runs `guestcred controller`; the shim image runs
# `guestcred-shim`, a binary with only the shim's code in it (a smaller resident set on
# every node).

FROM rust:1-bookworm AS builder
# The `virt` crate links libvirt through pkg-config.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libvirt-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# The whole workspace is copied because cargo reads every member's manifest; only the
# product package is compiled (.dockerignore keeps target/ and .lab/ out).
COPY . .
# Cache mounts keep the registry and target dir between builds; the binary is copied out
# of the cache because the next stage cannot see a cache mount.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p guestcred --bins \
    && install -D -m 0755 target/release/guestcred /out/guestcred \
    && install -D -m 0755 target/release/guestcred-shim /out/guestcred-shim

# The controller needs only libc/libgcc (rustls, no OpenSSL) ... and libvirt, because the
# `guestcred` binary also contains the shim: it is linked against libvirt0 even if it never
# calls it. distroless/cc has no libvirt0, so the controller is debian-slim too, as non-root.
FROM debian:bookworm-slim AS runtime-base
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libvirt0 ca-certificates \
    && rm -rf /var/lib/apt/lists/*

FROM runtime-base AS shim
COPY --from=builder /out/guestcred-shim /usr/local/bin/guestcred-shim
# Runs as root in the DaemonSet only where the host's sockets need it, with capabilities
# dropped there (see charts/guestcred and docs/install.md). The image default stays root
# because a non-root default cannot open root-owned libvirt sockets at all.
# hadolint ignore=DL3002
USER 0
ENTRYPOINT ["/usr/local/bin/guestcred-shim"]

FROM runtime-base AS controller
COPY --from=builder /out/guestcred /usr/local/bin/guestcred
# Same uid as distroless "nonroot"; the chart's securityContext runs it as 65532 too.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/guestcred"]
CMD ["controller"]
