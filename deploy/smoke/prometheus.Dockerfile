# Prometheus from Debian's package on the locally made base: a stand-in for
# prom/prometheus in deploy/smoke/run.sh (no Docker Hub there). Same contract as the
# official image for what docker-compose.yml uses: the binary is the entrypoint (compose
# passes its flags as the command), /prometheus is the data directory, a non-root user.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends prometheus \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /prometheus && chown prometheus:prometheus /prometheus
WORKDIR /prometheus
USER prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
