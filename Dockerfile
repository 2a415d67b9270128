# tollway as a container: `docker build -t tollway .`, then see docker-compose.yml.
# Not built or run where tollway is developed (no Docker engine there): a starting point.
FROM python:3.11-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends curl \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml requirements.lock README.md ./
COPY src ./src
# The lock pins every version; only the runtime dependencies are installed.
RUN pip install --no-cache-dir -c requirements.lock .

RUN useradd --create-home --uid 10001 tollway && mkdir /data && chown tollway /data
USER tollway
ENV TOLLWAY_DATA_DIR=/data \
    TOLLWAY_HTTP_HOST=0.0.0.0 \
    TOLLWAY_HTTP_PORT=8080
VOLUME ["/data"]
EXPOSE 8080

# The port the service listens on (TOLLWAY_HTTP_PORT, also when compose or `docker run -e` changes it).
HEALTHCHECK --interval=10s --timeout=3s CMD curl -fsS "http://127.0.0.1:${TOLLWAY_HTTP_PORT}/healthz" || exit 1
STOPSIGNAL SIGTERM
ENTRYPOINT ["tollway"]
CMD ["serve"]
