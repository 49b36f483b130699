# syntax=docker/dockerfile:1
# pgmux: build with the Rust toolchain, run on a slim Debian as a non-root user.
#   docker build -t pgmux .
#   docker run --rm -p 6432:6432 -p 127.0.0.1:9930:9930 --env-file pgmux.env \
#       -v "$PWD/config/pgmux.toml:/etc/pgmux/pgmux.toml:ro" pgmux
# The image has no secret in it and no default for one: pgmux.env (mode 600, never in the
# image or version control) sets PGMUX_ADMIN_TOKEN and PGMUX_POSTGRES_PASSWORD, which
# config/pgmux.toml requires. The admin port listens on every interface of the container,
# so pgmux refuses to start without its token. docker-compose.yml runs it next to a
# PostgreSQL, with the secrets from a .env file.

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
# reads these, as config/pgmux.toml does). The admin port then needs admin.token.
ENV PGMUX_LISTEN=0.0.0.0:6432 \
    PGMUX_ADMIN_LISTEN=0.0.0.0:9930
USER pgmux
# 6432: clients; 9930: admin HTTP and metrics.
EXPOSE 6432 9930
# pgmux drains on SIGTERM (docker stop): transactions finish, then clients get 57P01.
STOPSIGNAL SIGTERM
ENTRYPOINT ["pgmux"]
CMD ["--config", "/etc/pgmux/pgmux.toml"]
