"""Placeholder: filled in by the providers work."""

from fastapi import APIRouter

router = APIRouter()
