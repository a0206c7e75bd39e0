"""Placeholder: filled in by the webhooks work."""

from fastapi import APIRouter

router = APIRouter()
