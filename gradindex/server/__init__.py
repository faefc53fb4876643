"""gradindex's FastAPI server: ``create_app(settings)``, run by ``gradindex serve``."""

from .app import create_app, run
from .settings import ServerSettings

__all__ = ["ServerSettings", "create_app", "run"]
