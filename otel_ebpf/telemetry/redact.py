"""Query-string redaction: `url.query` with the values of sensitive parameters hidden.

In: the raw query string of a captured request-target (after the `?`, as on the wire).
Out: the same string with the value of every sensitive parameter replaced by
`REDACTED`; names, order, separators and non-sensitive values are kept byte for byte.

The stable HTTP semantic conventions (url.query) require instrumentations to redact
`AWSAccessKeyId`, `Signature`, `sig` and `X-Goog-Signature` by default; this project adds
"no credential leaves the host unless the operator asked for it", so the default list
also covers the usual token/password/key parameter names. Matching is
case-insensitive on the (not percent-decoded) parameter name: `Token=` and `TOKEN=`
are the same secret to a human reader. The list is configurable (TelemetryOptions).
"""

from __future__ import annotations

from collections.abc import Iterable

REDACTED = "REDACTED"

# The semconv four first, then common credential-carrying names.
DEFAULT_REDACTED_QUERY_PARAMS: tuple[str, ...] = (
    "AWSAccessKeyId",
    "Signature",
    "sig",
    "X-Goog-Signature",
    "X-Amz-Signature",
    "X-Amz-Credential",
    "X-Amz-Security-Token",
    "token",
    "access_token",
    "refresh_token",
    "id_token",
    "auth",
    "authorization",
    "password",
    "passwd",
    "pwd",
    "secret",
    "client_secret",
    "api_key",
    "apikey",
    "api-key",
    "key",
    "session",
    "sessionid",
    "code",
)


class QueryRedactor:
    """Callable: `redact(query) -> query'`. Build once; the per-call cost is a split."""

    __slots__ = ("_names",)

    def __init__(self, names: Iterable[str] = DEFAULT_REDACTED_QUERY_PARAMS) -> None:
        self._names = frozenset(n.lower() for n in names)

    def __call__(self, query: str) -> str:
        names = self._names
        if not names or "=" not in query:
            return query
        parts = query.split("&")
        changed = False
        for i, part in enumerate(parts):
            name, sep, value = part.partition("=")
            if sep and value and name.lower() in names:
                parts[i] = name + "=" + REDACTED
                changed = True
        return "&".join(parts) if changed else query
