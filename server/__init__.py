"""gradindex's FastAPI server. The app factory arrives with the influence server."""

__all__: list[str] = []
