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

The same object, with the same list, redacts process command lines
(`command_args()`): the one set of rules for every output (console, jsonl, OTLP spans
and resources), so that no output can disagree with another on what is a secret.
Command-line rules, argument by argument (argv as read from /proc/PID/cmdline):
- trailing empty arguments are dropped (nginx and other setproctitle users overwrite
  argv in place and leave dozens of empty strings behind);
- `--NAME=VALUE`, `-NAME=VALUE` and `NAME=VALUE` (environment-style pairs, as after
  `env`) with a sensitive NAME keep `NAME=` and lose the value;
- `--NAME VALUE` / `-NAME VALUE` with a sensitive NAME: the next argument is replaced
  (unless it is itself an option);
- `NAME: VALUE` (a header given to curl -H, wget --header) with a sensitive NAME;
- a few short options that are unambiguously a password only for one program:
  `mysql`-family `-pSECRET`, `sshpass -p`, `redis-cli -a`, `curl -u/--user user:pass`;
- URLs anywhere in an argument: `scheme://user:pass@host` -> `scheme://user:REDACTED@host`
  and their query strings through the query rules above.
A NAME is sensitive when, lower-cased with `-` read as `_`, it is in the list or its
last `_`-separated word is (`--db-password`, `GITHUB_TOKEN=`, `--aws-secret-access-key`,
`X-Api-Key:`). Over-redacting an innocent value (`--ssh-key PATH`) is the accepted
price of never sending a credential.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Iterable, Sequence

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


# scheme://user:password@ : the password goes (RFC 3986 userinfo; `@` and `/` cannot
# appear unencoded in it).
_URL_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^/?#@:\s]*):[^/?#@\s]*@")
# The query of a URL: after `scheme://authority/path?`, up to a fragment or a space.
_URL_QUERY = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^?#\s]*\?)([^#\s]*)")
# Short options that are a password for one program only (elsewhere `-p` is a port,
# `-a` an address, `-u` a user): program basename -> {option: how its value is given}.
# "attached": only `-pSECRET` (mysql's `-p VALUE` prompts and VALUE is the database);
# "both": `-p SECRET` or `-pSECRET`; "userinfo": `user:pass`, the part after `:` goes.
_PROGRAM_OPTIONS: dict[str, dict[str, str]] = {
    "mysql": {"-p": "attached"},
    "mysqldump": {"-p": "attached"},
    "mysqladmin": {"-p": "attached"},
    "mariadb": {"-p": "attached"},
    "mariadb-dump": {"-p": "attached"},
    "sshpass": {"-p": "both"},  # a wrapper: its first positional is the command
    "redis-cli": {"-a": "both"},
    "curl": {"-u": "userinfo", "--user": "userinfo", "-U": "userinfo",
             "--proxy-user": "userinfo"},
}

_WRAPPER = _PROGRAM_OPTIONS["sshpass"]


def _normalize(name: str) -> str:
    return name.lower().replace("-", "_")


class QueryRedactor:
    """Callable: `redact(query) -> query'`. Build once; the per-call cost is a split.

    Also `command_args(argv)` / `command_line(args)`: the process command line with the
    same list of sensitive names (see the module docstring)."""

    __slots__ = ("_names", "_words")

    def __init__(self, names: Iterable[str] = DEFAULT_REDACTED_QUERY_PARAMS) -> None:
        names = tuple(names)
        self._names = frozenset(n.lower() for n in names)
        # The same names for command-line options, env-style pairs and header names,
        # where `-` and `_` are interchangeable (`--api-key`, `API_KEY=`).
        self._words = frozenset(_normalize(n) for n in names)

    def __call__(self, query: str) -> str:
        names = self._names
        if not names or "=" not in query:
            return query
        if "&" not in query:  # one parameter (the common case): no split/join
            name, _, value = query.partition("=")
            if value and name.lower() in names:
                return name + "=" + REDACTED
            return query
        parts = query.split("&")
        changed = False
        for i, part in enumerate(parts):
            name, sep, value = part.partition("=")
            if sep and value and name.lower() in names:
                parts[i] = name + "=" + REDACTED
                changed = True
        return "&".join(parts) if changed else query

    # ---- command lines (once per process, not on the per-exchange path) ----

    def is_sensitive_name(self, name: str) -> bool:
        """`--db-password` / `GITHUB_TOKEN` / `X-Api-Key`: the whole name or its last word."""
        words = self._words
        if not words:
            return False
        norm = _normalize(name.lstrip("-"))
        return bool(norm) and (norm in words or norm.rpartition("_")[2] in words)

    def url(self, text: str) -> str:
        """Passwords in URL userinfo and sensitive query values, anywhere in `text`."""
        if "://" not in text:
            return text
        if "@" in text:
            text = _URL_USERINFO.sub(r"\1:" + REDACTED + "@", text)
        if "?" in text and self._names:
            text = _URL_QUERY.sub(lambda m: m.group(1) + self(m.group(2)), text)
        return text

    def command_args(self, argv: Sequence[str]) -> list[str]:
        """argv (from /proc/PID/cmdline) with secret values replaced by REDACTED and the
        trailing empty arguments dropped."""
        end = len(argv)
        while end and not argv[end - 1]:
            end -= 1
        if not end:
            return []
        program = _PROGRAM_OPTIONS.get(os.path.basename(argv[0])) if argv[0] else None
        out: list[str] = [self.url(argv[0])]
        redact_next: str | None = None  # "value" or "userinfo"
        for arg in argv[1:end]:
            if redact_next is not None:
                if arg.startswith("-") and len(arg) > 1:
                    redact_next = None  # a flag without a value (`--password --verbose`)
                else:
                    out.append(_userinfo(arg) if redact_next == "userinfo" else REDACTED)
                    redact_next = None
                    continue
            out.append(self._argument(arg, program))
            if arg[:1] != "-":
                # A positional naming a known program (`sudo mysql -pX`, `sshpass -p X
                # ssh -p 22`): its options from here on.
                table = _PROGRAM_OPTIONS.get(os.path.basename(arg))
                if table is not None or program is _WRAPPER:
                    program = table
                continue
            if "=" not in arg:
                if program is not None and arg in program and program[arg] != "attached":
                    redact_next = "userinfo" if program[arg] == "userinfo" else "value"
                elif arg.startswith("--") or len(arg) > 2:
                    if self.is_sensitive_name(arg):
                        redact_next = "value"
        return out

    def _argument(self, arg: str, program: dict[str, str] | None) -> str:
        if program is not None and arg[:1] == "-":
            for option, how in program.items():
                if len(option) == 2 and arg.startswith(option) and len(arg) > 2:
                    value = arg[2:]
                    if how == "userinfo":
                        return option + _userinfo(value)
                    return option + REDACTED
            name, sep, value = arg.partition("=")
            if sep and program.get(name) == "userinfo":
                return name + "=" + _userinfo(value)
        name, sep, value = arg.partition("=")
        if sep and value and name and " " not in name and "/" not in name \
                and self.is_sensitive_name(name):
            return name + "=" + REDACTED
        header, colon, value = arg.partition(":")
        if colon and value[:1] == " " and header and " " not in header \
                and self.is_sensitive_name(header):
            return header + ": " + REDACTED
        return self.url(arg)

    def command_line(self, args: Sequence[str]) -> str:
        """The (already redacted) args as one string: as `ps` shows a single rewritten
        title (`nginx: worker process`), shell-quoted when there are several."""
        if len(args) == 1:
            return args[0]
        return shlex.join(args)


def _userinfo(value: str) -> str:
    """curl's `user:password` -> `user:REDACTED` (a bare `user` prompts: kept)."""
    user, sep, _ = value.partition(":")
    return user + ":" + REDACTED if sep else value


# The one name for the object every output uses (the query rules and the command-line
# rules are the same list).
Redactor = QueryRedactor
