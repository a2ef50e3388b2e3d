# A Python service from PyPI on the local base: the MLflow server at the locked version (with the PostgreSQL and
# S3 clients its compose command uses) or moto's S3 server. mlflow/docker-compose.local.yml builds it twice,
# PACKAGES telling what to install. build-extra/*.crt are trusted (pip behind a TLS-intercepting proxy).
ARG BASE
FROM ${BASE}
COPY build-extra/ /tmp/build-extra/
RUN find /tmp/build-extra -maxdepth 1 -name '*.crt' -exec cp {} /usr/local/share/ca-certificates/ \; \
 && update-ca-certificates >/dev/null \
 && rm -rf /tmp/build-extra \
 && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
ARG PACKAGES
RUN pip install -q ${PACKAGES}
