"""Placeholder: filled in by the tracking work."""

from fastapi import APIRouter

router = APIRouter()
