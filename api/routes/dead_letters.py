"""Placeholder: filled in by the dead_letters work."""

from fastapi import APIRouter

router = APIRouter()
