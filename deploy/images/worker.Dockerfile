# The scale-out image: the serving image plus the training stack of the dev lock (DVC, Optuna, MLflow, pandas,
# Dask's distributed, ...), so that every machine of a sweep, a Dask cluster or a torchrun group runs one and the
# same environment (`hndsr.provenance.software` checks it: a worker with other code or packages is refused).
# Build it with `make worker-image` (deploy/images/build.sh --worker), after the serving image:
#   docker run --rm -v "$PWD:$PWD" -w "$PWD" hndsr-worker hndsr train autoencoder --worker
#   docker run --rm hndsr-worker dask scheduler          |   ... dask worker tcp://SCHEDULER:8786
#   docker run --rm -v "$PWD:$PWD" -w "$PWD" hndsr-worker torchrun --nnodes 2 --node-rank 0 ... -m hndsr.cli train
# It inherits the serving image's base, torch build, CA certificates and user (uid 10001; mounted project folders
# must be writable by it, or run with --user).
ARG SERVE=hndsr-serve:latest
FROM ${SERVE}
USER root
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt
# Same pins as the serving image's lock where both hold a package (the locks agree), the rest added; torch and
# the project are already there.
# git (about 190 MB with its dependencies): the commit every run is tagged with (hndsr.provenance, MLflow) and
# DVC, on a checkout mounted from the host (owned by another user, hence safe.directory).
RUN apt-get update -q && apt-get install -y -q --no-install-recommends git >/dev/null && rm -rf /var/lib/apt/lists/* \
 && git config --system --add safe.directory '*'
COPY requirements/dev.txt /tmp/requirements/dev.txt
RUN pip install -q --require-hashes --no-deps -r /tmp/requirements/dev.txt \
 && rm -rf /tmp/requirements \
 && cd / && python -c "import training.stages, pipeline.etl, optuna, distributed, mlflow.server, psycopg"
HEALTHCHECK NONE
USER hndsr
ENTRYPOINT []
CMD ["hndsr", "--help"]
