# cityhub: the hub services (ingest, alerts, gateway, simulator) and the `cityhub` command.
# Two stages: the first builds a virtual environment with the project and its
# dependencies (wheels only, no compiler needed), the second copies it into a
# slim runtime image that runs as an unprivileged user.
# The dependencies come from a lock file, pinned and hash-checked (scripts/lock):
# requirements/all.txt by default, since docker-compose.yml runs every role from
# this image (the gateway and the simulated fleet too); a hub-only image takes
#   docker build --build-arg CITYHUB_LOCK=central .

# Pinned by tag and digest (the multi-platform index of python:3.11.16-slim-bookworm, as
# pinned in several public repositories' Dockerfiles). To refresh:
#   docker buildx imagetools inspect python:3.11-slim-bookworm   # its "Digest:" line
# then change the patch version and digest together.
ARG PYTHON_IMAGE=python:3.11.16-slim-bookworm@sha256:528257d48c1da0dcecc2e725d1ae34498d60c965f1241e39cd6a85a8859bdf84

FROM ${PYTHON_IMAGE} AS build
ARG CITYHUB_LOCK=all
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
RUN python -m venv /opt/cityhub
# Dependencies first: this layer is rebuilt only when a lock file changes.
COPY requirements ./requirements
RUN /opt/cityhub/bin/pip install --require-hashes -r "requirements/${CITYHUB_LOCK}.txt"
COPY pyproject.toml README.md ./
COPY contracts ./contracts
COPY adapters ./adapters
COPY devices ./devices
COPY firmware_sim ./firmware_sim
COPY gateway ./gateway
COPY ingest ./ingest
COPY alerts ./alerts
COPY grafana ./grafana
COPY cityhub ./cityhub
RUN /opt/cityhub/bin/pip install --no-deps . \
    && /opt/cityhub/bin/python -c "import cityhub.cli.main, grafana.render"

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="cityhub" \
      org.opencontainers.image.description="Smart-city telemetry hub: gateways, ingest, alerts, Grafana boards" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/cityhub/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# uid 10001 for the services; 1883 is the broker's uid in the eclipse-mosquitto
# image: the mosquitto-init service writes the broker's account file as that
# uid into this directory (a fresh named volume takes its ownership from here).
# bundles/: the compose stack's provisioning jobs write gateway bundles there
# (a named volume shared with the demo gateway), 0700 as bundles hold secrets;
# state/pki/: their certificate register and CRL (a named volume mosquitto-init
# reads the CRL from), 0700 as it holds the CA's key.
RUN groupadd --system --gid 10001 cityhub \
    && useradd --system --uid 10001 --gid cityhub --home-dir /var/lib/cityhub --create-home cityhub \
    && install -d -o cityhub -g cityhub -m 0750 /var/lib/cityhub/state /var/lib/cityhub/outbox \
    && install -d -o cityhub -g cityhub -m 0700 /var/lib/cityhub/bundles /var/lib/cityhub/state/pki \
    && install -d -o 1883 -g 1883 -m 0700 /mosquitto/security
COPY --from=build /opt/cityhub /opt/cityhub
COPY deploy/mosquitto/mosquitto-init.py /opt/cityhub/share/mosquitto-init.py
USER cityhub
WORKDIR /var/lib/cityhub
ENTRYPOINT ["cityhub"]
CMD ["--help"]
