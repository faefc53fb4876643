"""gradindex's HTTP client (httpx and pydantic only). The endpoints arrive with the server."""

__all__: list[str] = []
