# Redis from Debian's package on the locally made base: a stand-in for redis:7.4-alpine in
# deploy/smoke/run.sh (no Docker Hub there). Same contract as the official image for what
# docker-compose.yml uses: `redis-server ARGS...` as the command, data in /data (the volume),
# redis-cli for the health check, a non-root user, and protected mode off (the official image
# builds it so; without it Redis refuses the other containers).
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /data && chown redis:redis /data \
 && printf '#!/bin/sh\nif [ "$1" = redis-server ]; then shift; exec redis-server "$@" --protected-mode no; fi\nexec "$@"\n' \
      > /usr/local/bin/redis-entrypoint && chmod 755 /usr/local/bin/redis-entrypoint
WORKDIR /data
USER redis
EXPOSE 6379
ENTRYPOINT ["/usr/local/bin/redis-entrypoint"]
CMD ["redis-server"]
