# NETRT: one image for the listener (`netrt serve --no-worker`) and for Prefect workers.
# The install step is the same as CI's (`uv sync --frozen` of uv.lock), without the dev group.
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
RUN groupadd --system netrt && useradd --system --gid netrt --home-dir /var/lib/netrt --create-home netrt
COPY --from=build /opt/netrt/.venv /opt/netrt/.venv
COPY prefect.yaml netrt.example.yaml /opt/netrt/
COPY flows /opt/netrt/flows
ENV PATH=/opt/netrt/.venv/bin:$PATH \
    NETRT_HOME=/opt/netrt \
    NETRT_PATHS__DATA_DIR=/var/lib/netrt/data \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DO_NOT_TRACK=1
WORKDIR /opt/netrt
USER netrt
EXPOSE 11112 4200
ENTRYPOINT ["netrt"]
CMD ["serve"]
