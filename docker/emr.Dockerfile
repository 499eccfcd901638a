# The Python environment for Amazon EMR 7.x (Amazon Linux 2023, Spark 3.5), packed as one archive
# that spark-submit ships to every node (--archives ...#environment, see the README).
#   DOCKER_BUILDKIT=1 docker build -f docker/emr.Dockerfile --output dist .
# produces dist/bfpack-env.tar.gz. pyspark is pinned to EMR's Spark line; the cluster's own
# Spark runs the job, the pip package only provides the Python side.
FROM amazonlinux:2023 AS build
RUN dnf install -y python3.11 python3.11-pip gcc python3.11-devel tar gzip && dnf clean all
RUN python3.11 -m venv /opt/bfpack-env
COPY pyproject.toml README.md /src/
COPY bfpack_spark /src/bfpack_spark
RUN /opt/bfpack-env/bin/pip install --no-cache-dir "pyspark==3.5.*" "delta-spark>=3.2,<4" /src venv-pack \
 && /opt/bfpack-env/bin/venv-pack -p /opt/bfpack-env -o /bfpack-env.tar.gz

FROM scratch
COPY --from=build /bfpack-env.tar.gz /
