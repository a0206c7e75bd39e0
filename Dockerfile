# One image for every process: `marquee api`, `marquee worker`, `marquee migrate`.
FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY requirements.lock ./
RUN pip install --no-cache-dir --require-hashes -r requirements.lock
COPY pyproject.toml README.md worker.py ./
COPY api ./api
COPY activities ./activities
COPY admin ./admin
COPY channels ./channels
COPY core ./core
COPY migrations ./migrations
COPY workflows ./workflows
RUN pip install --no-cache-dir --no-deps --no-build-isolation . && useradd --system marquee
USER marquee
EXPOSE 8000
CMD ["marquee", "api", "--host", "0.0.0.0"]
