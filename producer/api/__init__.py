"""The HTTP API: ``create_app()`` (app.py) builds the FastAPI app that ``mmq api`` serves."""

from producer.api.app import create_app

__all__ = ["create_app"]
