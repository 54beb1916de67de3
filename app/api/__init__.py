"""The HTTP API and read-only dashboard: `create_app()` builds them."""

from app.api.main import create_app

__all__ = ["create_app"]
