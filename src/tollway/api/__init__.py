"""The HTTP API of tollway: an ASGI app (FastAPI) over a running service.

- :mod:`~tollway.api.app` — :func:`create_app`, the factory;
- :mod:`~tollway.api.auth` — bearer JWTs, scopes, the ``accounts`` claim, token issuing;
- :mod:`~tollway.api.errors` — the one error table;
- :mod:`~tollway.api.schemas` / :mod:`~tollway.api.wire` — request models, response shapes;
- :mod:`~tollway.api.translate` — bodies → engine commands;
- ``routes_*`` — the thin handlers.
"""

from tollway.api.app import create_app
from tollway.api.auth import Authenticator, Principal, Scope, issue_token

__all__ = ["Authenticator", "Principal", "Scope", "create_app", "issue_token"]
