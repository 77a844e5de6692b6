# A Redis image made from a local Debian base, for machines where no registry answers
# (scripts/compose-check builds it when the official image cannot be pulled). The stack
# runs it exactly like the official one: `redis-server` with the flags of docker-compose.yml,
# data in /data, as the unprivileged user redis.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
# The base is local and unpinned (debootstrap of the current release): its release is the pin.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data && chown redis:redis /data
# The Debian package creates the user redis with a system id that varies by release.
# hadolint ignore=DL3066
USER redis
WORKDIR /data
VOLUME ["/data"]
EXPOSE 6379
CMD ["redis-server"]
