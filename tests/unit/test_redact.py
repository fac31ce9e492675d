"""One redactor for every output: query strings and process command lines share the
list of sensitive names (telemetry.redacted_query_params)."""

from __future__ import annotations

import pytest

from otel_ebpf.telemetry.redact import REDACTED, QueryRedactor

R = REDACTED


@pytest.mark.parametrize("argv, expected", [
    # setproctitle-style rewrite: the title, without the empty strings left behind
    (["nginx: worker process"] + [""] * 40, ["nginx: worker process"]),
    (["nginx: master process /usr/sbin/nginx", "", ""], ["nginx: master process /usr/sbin/nginx"]),
    (["app", "", "x", ""], ["app", "", "x"]),  # only trailing empties go
    (["", ""], []),
    # --name value / --name=value, with names from the shared list
    (["app", "--password", "hunter2", "--verbose"], ["app", "--password", R, "--verbose"]),
    (["app", "--password=hunter2"], ["app", "--password=" + R]),
    (["app", "--token", "t", "--api-key=k", "--secret", "s", "--port", "80"],
     ["app", "--token", R, "--api-key=" + R, "--secret", R, "--port", "80"]),
    (["app", "-password", "x"], ["app", "-password", R]),
    # the last word of a compound name counts
    (["app", "--db-password", "x", "--aws-secret-access-key=y", "--client_secret", "z"],
     ["app", "--db-password", R, "--aws-secret-access-key=" + R, "--client_secret", R]),
    # a flag without a value does not swallow the next option
    (["app", "--password", "--verbose", "x"], ["app", "--password", "--verbose", "x"]),
    # env-style pairs
    (["env", "GITHUB_TOKEN=abc", "PATH=/bin", "key=v", "user=bob", "password="],
     ["env", "GITHUB_TOKEN=" + R, "PATH=/bin", "key=" + R, "user=bob", "password="]),
    # headers on the command line
    (["curl", "-H", "Authorization: Bearer abc", "-H", "X-Api-Key: k", "-H", "Accept: */*"],
     ["curl", "-H", "Authorization: " + R, "-H", "X-Api-Key: " + R, "-H", "Accept: */*"]),
    # URLs: userinfo password and the query through the query rules
    (["curl", "https://bob:pw@example.com/x?q=1&token=abc#frag"],
     ["curl", "https://bob:" + R + "@example.com/x?q=1&token=" + R + "#frag"]),
    (["app", "--db=postgres://app:s3cr3t@db:5432/shop", "redis://:pw@cache:6379/0"],
     ["app", "--db=postgres://app:" + R + "@db:5432/shop", "redis://:" + R + "@cache:6379/0"]),
    (["app", "http://user@host/p?q=1"], ["app", "http://user@host/p?q=1"]),
    # -p only where unambiguous
    (["ssh", "-p", "22", "host"], ["ssh", "-p", "22", "host"]),
    (["mysql", "-uroot", "-psecret", "shop"], ["mysql", "-uroot", "-p" + R, "shop"]),
    (["mysql", "-p", "shop"], ["mysql", "-p", "shop"]),  # -p alone prompts; shop is the db
    (["/usr/bin/sshpass", "-p", "pw", "ssh", "-p", "22", "h"],
     ["/usr/bin/sshpass", "-p", R, "ssh", "-p", "22", "h"]),
    (["sudo", "-u", "app", "mysql", "-psecret"], ["sudo", "-u", "app", "mysql", "-p" + R]),
    (["redis-cli", "-a", "pw", "ping"], ["redis-cli", "-a", R, "ping"]),
    (["curl", "-u", "bob:pw", "--user=al:pw2", "http://h/"],
     ["curl", "-u", "bob:" + R, "--user=al:" + R, "http://h/"]),
    # innocent command lines are untouched
    (["python3", "-m", "http.server", "--directory", "/srv/www y", "8000"],
     ["python3", "-m", "http.server", "--directory", "/srv/www y", "8000"]),
])
def test_command_args_default_rules(argv, expected):
    assert QueryRedactor().command_args(argv) == expected


def test_command_line_is_ps_like():
    r = QueryRedactor()
    assert r.command_line(r.command_args(["nginx: worker process", "", ""])) == \
        "nginx: worker process"
    assert r.command_line(["app", "--password", R, "/a b"]) == "app --password REDACTED '/a b'"


def test_command_line_uses_the_configured_list_like_queries():
    r = QueryRedactor(("q", "Pin"))
    assert r("q=1&token=abc") == "q=" + R + "&token=abc"
    assert r.command_args(["app", "--pin", "1234", "--token", "t", "q=9", "http://h/?q=1&token=2"]) \
        == ["app", "--pin", R, "--token", "t", "q=" + R, "http://h/?q=" + R + "&token=2"]
    # an empty list turns off name-based redaction (URL passwords still go)
    r = QueryRedactor(())
    assert r.command_args(["app", "--password", "x", "http://u:p@h/?token=1"]) == \
        ["app", "--password", "x", "http://u:" + R + "@h/?token=1"]
