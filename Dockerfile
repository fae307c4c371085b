# pgwarden: multi-stage build, small non-root runtime image.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY bench ./bench
COPY tests ./tests
RUN cargo build --release --locked --bin pgwarden

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home pgwarden
COPY --from=build /src/target/release/pgwarden /usr/local/bin/pgwarden
COPY pgwarden.example.toml /etc/pgwarden/pgwarden.example.toml
USER 10001
ENV PGWARDEN_LISTEN=0.0.0.0:4444 \
    PGWARDEN_OPS_LISTEN=0.0.0.0:9464 \
    PGWARDEN_PG_LISTEN=0.0.0.0:6432 \
    PGWARDEN_LOG_FORMAT=json
EXPOSE 4444 6432 9464
ENTRYPOINT ["/usr/local/bin/pgwarden"]
