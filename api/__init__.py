"""The HTTP API (FastAPI): starts, inspects and cancels workflows; reads PostgreSQL."""
