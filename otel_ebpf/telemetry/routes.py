"""http.route: a low-cardinality template for every request path.

In: a raw url.path (no query) and the pid that served or sent it. Out: a route string
that is safe as a metric attribute. A raw path never comes out of here unchanged
unless it has no identifier-looking segment.

Order of rules:
1. Configured patterns, first match wins, returned verbatim as the route:
   `/users/{id}` (`{name}` matches exactly one non-empty segment, literals match
   themselves) and `/static/*` (a trailing `*` matches the rest of the path, also
   `/static` itself).
2. Default templating: each segment that looks like an identifier becomes `{id}`:
   all digits; a UUID; hex of >= 8 characters with at least one digit; a long token
   (>= 16 characters with a digit, >= 32 of anything, or containing `@`); or any
   segment longer than 64 characters.
   A request-target that is not a path (other than `*`) gets OVERFLOW_ROUTE.
3. Overflow: per pid, at most `max_routes` distinct default-templated routes are
   handed out; after that every new one becomes OVERFLOW_ROUTE, `/*` (a catch-all
   template, which is what it honestly is). Configured patterns never overflow: their
   number is bounded by the configuration.

The templating of step 2 is a pure function of the path, cached by raw path in two
generations of plain dicts (at most `cache_size` entries together): new results go into
the young one; when it holds half the bound it becomes the old one and the previous
old one is dropped; a path found in the old generation moves to the young one. That
keeps what repeats (like an LRU) at one dict lookup per hit and no bookkeeping per
miss, which is what a flood of never-seen paths (every request a miss) costs. Step 3
is one set lookup per call.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

OVERFLOW_ROUTE = "/*"
PLACEHOLDER = "{id}"
# Paths longer than this are templated every time instead of cached: an attacker
# with very long random paths must not be able to pin memory through the cache.
_MAX_CACHED_PATH = 512

_UUID = re.compile(
    r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}\Z")
_HEX = re.compile(r"[0-9a-fA-F]{8,}\Z")
_HAS_DIGIT = re.compile(r"\d")


def is_identifier(segment: str) -> bool:
    """Does this path segment look like an id (high-cardinality) rather than a word?"""
    n = len(segment)
    if n < 8:  # the common case, words like "api", "v1", "users": no regex
        return segment.isdigit() or "@" in segment
    if segment.isdigit():
        return True
    if n > 64:
        return True
    if n >= 8 and _HEX.match(segment) and _HAS_DIGIT.search(segment):
        return True
    if _UUID.match(segment):
        return True
    if n >= 32 or "@" in segment:
        return True
    return n >= 16 and _HAS_DIGIT.search(segment) is not None


def template_path(path: str) -> str:
    """Default templating (rule 2) of one path."""
    if not path.startswith("/"):
        # "OPTIONS *" keeps its asterisk-form; anything else is not a path at all.
        return path if path == "*" else OVERFLOW_ROUTE
    segments = path.split("/")
    changed = False
    for i, segment in enumerate(segments):
        # is_identifier's short-segment rule inlined: most segments are short.
        if len(segment) < 8:
            if segment.isdigit() or "@" in segment:
                segments[i] = PLACEHOLDER
                changed = True
        elif is_identifier(segment):
            segments[i] = PLACEHOLDER
            changed = True
    return "/".join(segments) if changed else path


class _Pattern:
    __slots__ = ("text", "segments", "prefix")

    def __init__(self, text: str) -> None:
        if not text.startswith("/"):
            raise ValueError("route pattern %r must start with '/'" % (text,))
        self.text = text
        self.prefix: str | None = None
        if text.endswith("/*"):
            self.prefix = text[:-1]  # "/static/"
            text = text[:-2]
        elif "*" in text:
            raise ValueError(
                "route pattern %r: '*' is only allowed as the last segment ('/static/*')"
                % (self.text,)
            )
        # None = a {placeholder} segment matching any one non-empty segment.
        self.segments: list[str | None] = [
            None if s.startswith("{") and s.endswith("}") and len(s) > 2 else s
            for s in text.split("/")
        ]

    def match(self, path: str, parts: list[str]) -> bool:
        if self.prefix is not None:
            if path.startswith(self.prefix) or path == self.prefix[:-1]:
                return self._match_segments(parts[: len(self.segments)], exact_len=False)
            return False
        return self._match_segments(parts, exact_len=True)

    def _match_segments(self, parts: list[str], exact_len: bool) -> bool:
        segs = self.segments
        if exact_len and len(parts) != len(segs):
            return False
        if len(parts) < len(segs):
            return False
        for want, got in zip(segs, parts):
            if want is None:
                if not got:
                    return False
            elif want != got:
                return False
        return True


class RouteResolver:
    """path -> http.route, with configured patterns, default templating and overflow."""

    __slots__ = ("_patterns", "_max_routes", "_young", "_old", "_generation_size",
                 "_per_pid")

    def __init__(
        self,
        patterns: Iterable[str] = (),
        max_routes: int = 200,
        cache_size: int = 4096,
    ) -> None:
        self._patterns = [_Pattern(p) for p in patterns]
        self._max_routes = max_routes
        # raw path -> (route, from_pattern), two generations of cache_size // 2 each
        self._generation_size = max(1, cache_size // 2)
        self._young: dict[str, tuple[str, bool]] = {}
        self._old: dict[str, tuple[str, bool]] = {}
        self._per_pid: dict[int, set[str]] = {}

    def _compute(self, path: str) -> tuple[str, bool]:
        if self._patterns:
            parts = path.split("/")
            for pattern in self._patterns:
                if pattern.match(path, parts):
                    return pattern.text, True
        return template_path(path), False

    def route(self, pid: int, path: str) -> str:
        hit = self._young.get(path)
        if hit is None:
            hit = self._old.get(path)
            if hit is None:
                hit = self._compute(path)
            if len(path) <= _MAX_CACHED_PATH:
                young = self._young
                if len(young) >= self._generation_size:
                    self._old = young
                    young = self._young = {}
                young[path] = hit
        route, from_pattern = hit
        if from_pattern:
            return route
        seen = self._per_pid.get(pid)
        if seen is None:
            seen = self._per_pid[pid] = set()
        if route in seen:
            return route
        if len(seen) >= self._max_routes:
            return OVERFLOW_ROUTE
        seen.add(route)
        return route

    def cached_paths(self) -> int:
        """Entries in the templating cache (both generations; for tests and stats)."""
        return len(self._young) + len(self._old)

    def forget(self, pid: int) -> None:
        self._per_pid.pop(pid, None)

    def routes_of(self, pid: int) -> int:
        """Distinct default routes handed out for pid (for tests and stats)."""
        return len(self._per_pid.get(pid, ()))
