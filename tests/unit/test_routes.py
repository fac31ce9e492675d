"""http.route: configured patterns, default templating, per-pid overflow; redaction."""

from __future__ import annotations

import pytest

from otel_ebpf.telemetry.redact import REDACTED, QueryRedactor
from otel_ebpf.telemetry.routes import OVERFLOW_ROUTE, RouteResolver, template_path


@pytest.mark.parametrize("path,route", [
    ("/users/42", "/users/{id}"),
    ("/users/42/orders/7", "/users/{id}/orders/{id}"),
    ("/items/550e8400-e29b-41d4-a716-446655440000", "/items/{id}"),
    ("/items/550e8400e29b41d4a716446655440000", "/items/{id}"),
    ("/blob/deadbeef12", "/blob/{id}"),
    ("/t/eyJhbGciOiJIUzI1NiJ9abc", "/t/{id}"),
    ("/u/someone@example.com/profile", "/u/{id}/profile"),
    ("/x/" + "a" * 70, "/x/{id}"),
    ("/api/v1/health", "/api/v1/health"),
    ("/docs/page2", "/docs/page2"),
    ("/assets/database", "/assets/database"),  # a word, even if hex-ish letters
    ("/", "/"),
    ("/a//b/", "/a//b/"),
    ("*", "*"),
])
def test_default_templating(path, route):
    assert template_path(path) == route


def test_patterns_first_match_and_prefix_wildcard():
    r = RouteResolver(["/users/{uid}/cart", "/users/{uid}", "/static/*"])
    assert r.route(1, "/users/abc/cart") == "/users/{uid}/cart"
    assert r.route(1, "/users/abc") == "/users/{uid}"
    assert r.route(1, "/users/") == "/users/"  # {uid} needs a non-empty segment
    assert r.route(1, "/static/css/site.css") == "/static/*"
    assert r.route(1, "/static") == "/static/*"
    assert r.route(1, "/staticfiles/x") == "/staticfiles/x"
    assert r.route(1, "/users/7/other") == "/users/{id}/other"  # default templating


@pytest.mark.parametrize("bad", ["users/{id}", "/a/*/b", "/a*"])
def test_bad_patterns_are_rejected_with_the_pattern_named(bad):
    with pytest.raises(ValueError, match="route pattern"):
        RouteResolver([bad])


def test_overflow_per_pid_after_max_routes():
    r = RouteResolver(max_routes=5)
    routes = [r.route(1, "/page-%s" % chr(ord("a") + i)) for i in range(23)]
    assert routes[:5] == ["/page-%s" % c for c in "abcde"]
    assert routes[5:] == [OVERFLOW_ROUTE] * 18
    assert r.route(1, "/page-c") == "/page-c"  # known routes keep working
    assert r.route(2, "/page-x") == "/page-x"  # another process has its own budget
    r.forget(1)
    assert r.route(1, "/page-z") == "/page-z"
    assert r.routes_of(1) == 1


def test_patterns_never_overflow():
    r = RouteResolver(["/users/{id}"], max_routes=1)
    assert r.route(1, "/a") == "/a"
    assert r.route(1, "/b") == OVERFLOW_ROUTE
    assert r.route(1, "/users/3") == "/users/{id}"


def test_cache_is_bounded():
    r = RouteResolver(cache_size=16)
    for i in range(23):
        r.route(1, "/n/%d" % i)
    assert r.cached_paths() == 8 + 7  # the old generation full, the young one filling
    for i in range(1000):
        r.route(1, "/m/%d" % i)
        assert r.cached_paths() <= 16
    assert r.route(1, "/n/999") == "/n/{id}"
    r.route(1, "/long/" + "x" * 600)
    assert all(len(p) <= 512 for p in [*r._young, *r._old])


def test_cache_keeps_what_repeats_through_a_flood_of_new_paths():
    r = RouteResolver(cache_size=16)
    r.route(1, "/hot")
    for i in range(100):  # 100 never-seen paths, the hot one asked for every 4th
        r.route(1, "/cold/%x" % (i * 7919))
        if i % 4 == 0:
            r.route(1, "/hot")
        assert "/hot" in r._young or "/hot" in r._old
    assert r.route(1, "/hot") == "/hot"


def test_redaction_keeps_everything_else_byte_for_byte():
    redact = QueryRedactor()
    assert redact("a=1&b=2") == "a=1&b=2"
    assert redact("X-Goog-Signature=abc&AWSAccessKeyId=k&x=") == (
        "X-Goog-Signature=%s&AWSAccessKeyId=%s&x=" % (REDACTED, REDACTED))
    assert redact("TOKEN=1&token&Password=p&&api_key=") == (
        "TOKEN=REDACTED&token&Password=REDACTED&&api_key=")
    assert redact("") == ""
    assert QueryRedactor(())("token=1") == "token=1"
