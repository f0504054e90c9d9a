# podgate container image.
#   docker build -t podgate .
#   docker run -p 8080:8080 -v $PWD/conf:/etc/podgate podgate
# Ports: 8080 (proxy, as in the default conf), 9901 (admin; loopback-only unless the conf says
# otherwise). The conf is read from /etc/podgate/podgate.yaml.
# CI cannot run a container engine: scripts/docker-replay.sh replays the build stage (the same
# COPY set and the same RUN commands, `cargo build` checked as `cargo check`) in a temp dir.

# --- build ------------------------------------------------------------------------------------
FROM rust:1.95-bookworm AS build
# pingora-core builds zlib-ng with cmake.
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
WORKDIR /src

# Dependencies first, in their own layer: only the manifests, with stub sources, so that a code
# change does not rebuild Pingora and friends. Stripped by cargo (same profile for both builds,
# so the dependency layer stays valid for the second one).
ENV CARGO_PROFILE_RELEASE_STRIP=symbols
COPY rust-toolchain.toml Cargo.toml Cargo.lock ./
COPY gateway/Cargo.toml gateway/
COPY discovery/Cargo.toml discovery/
COPY scripts/stub-targets.sh scripts/
# Every target the manifests name (bins, benches, examples) gets a stub file, derived from the
# manifests themselves: a new bench cannot break the image (issue 14).
RUN sh scripts/stub-targets.sh .
RUN cargo build --release --locked --bin podgate \
 && rm -rf src gateway/src discovery/src

COPY src src
COPY gateway/src gateway/src
COPY discovery/src discovery/src
# touch: make cargo see the real sources as newer than the stub build.
RUN touch src/main.rs src/lib.rs gateway/src/lib.rs discovery/src/lib.rs \
 && cargo build --release --locked --bin podgate

# --- run --------------------------------------------------------------------------------------
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home podgate
COPY --from=build /src/target/release/podgate /usr/local/bin/podgate
COPY conf/container.yaml /etc/podgate/podgate.yaml
COPY conf/container-cluster /etc/podgate/container-cluster
USER 10001
EXPOSE 8080 9901
ENTRYPOINT ["/usr/local/bin/podgate"]
CMD ["-c", "/etc/podgate/podgate.yaml"]
