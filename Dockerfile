# syntax=docker/dockerfile:1
# pgmux: build with the Rust toolchain, run on a slim Debian as a non-root user.
#   docker build -t pgmux .
#   docker run --rm -p 6432:6432 -v "$PWD/config/pgmux.toml:/etc/pgmux/pgmux.toml:ro" pgmux
# docker-compose.yml runs it next to a PostgreSQL.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# The caches keep crates and build artifacts between builds; the binary is copied out of
# the target cache in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
    && install -m 0755 target/release/pgmux /usr/local/bin/pgmux

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --user-group --uid 10001 --no-create-home --shell /usr/sbin/nologin pgmux
COPY --from=build /usr/local/bin/pgmux /usr/local/bin/pgmux
COPY config/pgmux.toml /etc/pgmux/pgmux.toml
# In a container clients come from outside: listen on every interface (for a config that
# reads these, as config/pgmux.toml does).
ENV PGMUX_LISTEN=0.0.0.0:6432 \
    PGMUX_ADMIN_LISTEN=0.0.0.0:9930
USER pgmux
# 6432: clients; 9930: admin HTTP and metrics.
EXPOSE 6432 9930
# pgmux drains on SIGTERM (docker stop): transactions finish, then clients get 57P01.
STOPSIGNAL SIGTERM
ENTRYPOINT ["pgmux"]
CMD ["--config", "/etc/pgmux/pgmux.toml"]
