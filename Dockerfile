# The gateway in a container: built with the Rust toolchain, run on a small Debian as
# a user of its own, its data directory a volume. A plain build: no sandbox, no wa-sim.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p zapgate \
 && install -m 0755 target/release/zapgate /usr/local/bin/zapgate

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin zapgate \
 && mkdir /data && chown zapgate:zapgate /data && chmod 0700 /data
COPY --from=build /usr/local/bin/zapgate /usr/local/bin/zapgate
USER zapgate
ENV ZAPGATE_DATA_DIR=/data ZAPGATE_LISTEN=0.0.0.0:8080
VOLUME /data
EXPOSE 8080
# Alive when it answers /healthz (the image has no curl: the gateway asks itself).
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
  CMD ["zapgate", "health"]
# SIGTERM: the gateway stops its numbers, keeps their sessions, and (on PostgreSQL)
# leaves the other nodes its instances at once.
STOPSIGNAL SIGTERM
ENTRYPOINT ["zapgate"]
CMD ["serve"]
