# One image for every process: `marquee api`, `marquee worker`, `marquee migrate` (the compose
# file picks the command). The packages copied are pyproject.toml's (tests/unit/test_compose.py checks).
FROM python:3.11.10-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY requirements.lock ./
RUN pip install --no-cache-dir --require-hashes -r requirements.lock
COPY pyproject.toml README.md worker.py ./
COPY activities ./activities
COPY admin ./admin
COPY api ./api
COPY channels ./channels
COPY core ./core
COPY entrypoints ./entrypoints
COPY migrations ./migrations
COPY services ./services
COPY workflows ./workflows
RUN pip install --no-cache-dir --no-deps --no-build-isolation . && useradd --system marquee
USER marquee
EXPOSE 8000 8001
CMD ["marquee", "api", "--host", "0.0.0.0"]
