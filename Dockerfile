# NETRT: one image for the listener, Prefect process workers, the Prefect server and `netrt serve`;
# the role is the first argument (deployments/docker/entrypoint.sh; default: listener).
#   docker build -t netrt:latest .       docker compose up -d   (see DEPLOYMENT.md)
# The install step is CI's (`./dev setup`: uv of the same version, `uv sync --frozen` of uv.lock),
# without the dev group and as a regular (non-editable) install. uv stays in the build stage.
FROM python:3.11-slim AS build
ENV UV_PYTHON_DOWNLOADS=never UV_LINK_MODE=copy UV_COMPILE_BYTECODE=1
RUN pip install --no-cache-dir uv==0.13.9
WORKDIR /opt/netrt
COPY pyproject.toml uv.lock README.md ./
COPY netrt ./netrt
COPY flows ./flows
COPY listener ./listener
COPY bench ./bench
RUN uv sync --frozen --no-dev --no-editable

FROM python:3.11-slim
RUN groupadd --system --gid 10001 netrt \
    && useradd --system --uid 10001 --gid netrt --home-dir /var/lib/netrt --create-home netrt \
    && mkdir -p /var/lib/netrt/data /etc/netrt \
    && chown netrt:netrt /var/lib/netrt/data
COPY --from=build /opt/netrt/.venv /opt/netrt/.venv
COPY prefect.yaml netrt.example.yaml /opt/netrt/
COPY flows /opt/netrt/flows
COPY deployments/docker/netrt.yaml /etc/netrt/netrt.yaml
COPY deployments/docker/entrypoint.sh /usr/local/bin/netrt-entrypoint
ENV PATH=/opt/netrt/.venv/bin:$PATH \
    NETRT_HOME=/opt/netrt \
    NETRT_CONFIG=/etc/netrt/netrt.yaml \
    PREFECT_HOME=/var/lib/netrt/prefect \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DO_NOT_TRACK=1 \
    PYTHONUNBUFFERED=1
WORKDIR /opt/netrt
USER 10001:10001
VOLUME ["/var/lib/netrt/data"]
EXPOSE 11112 4200
# C-ECHO to the container's own listener (listener.host/port/ae_title of $NETRT_CONFIG). Worker
# and server containers have no listener: docker-compose.yml gives them their own checks.
HEALTHCHECK --interval=30s --timeout=15s --start-period=90s --retries=3 CMD ["netrt-entrypoint", "health"]
ENTRYPOINT ["netrt-entrypoint"]
CMD ["listener"]
