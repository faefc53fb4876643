"""gradindex's HTTP client: ``Client`` and ``AsyncClient`` (httpx and pydantic only).

    from gradindex_client import Client
    with Client("http://127.0.0.1:8000", api_key="gik_...") as c:
        top = c.influence("digits", [{"x": [...], "y": 3}], k=10, direction="both")
        top.to_pandas()
"""

__version__ = "0.1.0"

from ._client import DEFAULT_URL, AsyncClient, Client
from ._errors import (
    AuthenticationError,
    BadRequest,
    ConnectionFailed,
    GradindexHTTPError,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    ServiceUnavailable,
)
from ._models import (
    Example,
    ExamplePage,
    Health,
    IndexDetail,
    IndexSummary,
    InfluenceResponse,
    InfluenceResult,
    ScoresResponse,
    SelectResponse,
    SelfInfluencePage,
    TrainingExample,
    Whoami,
)

__all__ = [
    "DEFAULT_URL",
    "AsyncClient",
    "AuthenticationError",
    "BadRequest",
    "Client",
    "ConnectionFailed",
    "Example",
    "ExamplePage",
    "GradindexHTTPError",
    "Health",
    "IndexDetail",
    "IndexSummary",
    "InfluenceResponse",
    "InfluenceResult",
    "InvalidRequest",
    "NotFound",
    "PayloadTooLarge",
    "PermissionDenied",
    "ScoresResponse",
    "SelectResponse",
    "SelfInfluencePage",
    "ServiceUnavailable",
    "TrainingExample",
    "Whoami",
    "__version__",
]
