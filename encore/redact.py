"""Masking credentials in text that leaves the process: error messages, logs, HTTP bodies.

Store URLs (``redis://:PASSWORD@host/0``, ``postgresql://user:PASSWORD@host/db``) and libpq
conninfo strings (``host=db password=PASSWORD``) end up in exception messages; every message
that a user, a log or an HTTP client can see goes through :func:`redact` first.
"""

from __future__ import annotations

import logging
import re

MASK = "***"

# scheme://[user[:password]@]host...: the userinfo ends at the *last* '@' before whitespace
# or a quote, not at the first '/', so a password holding a raw '@' or '/' (mistyped, but
# seen in the wild) is still masked whole. Masking a little too much is the safe mistake.
_URL = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<rest>[^\s'\"<>]*)")
# password=... in libpq conninfo ("password=x", "password = 'x y'") and URL query strings
# ("?password=x&..."), and "password": "x" / 'password': 'x' in dict or JSON dumps.
_CONNINFO = re.compile(
    r"(?P<key>\bpassword\s*=\s*)(?P<value>'(?:[^'\\]|\\.)*'|[^\s&;,'\"]+)", re.IGNORECASE
)
_QUOTED = re.compile(
    r"""(?P<key>(?P<q>['"])password(?P=q)\s*:\s*)(?P<value>(?P<v>['"]).*?(?P=v))""", re.IGNORECASE
)


def _mask_url(match: re.Match[str]) -> str:
    userinfo, at, host = match["rest"].rpartition("@")
    if not at:
        return match[0]
    user, colon, _password = userinfo.partition(":")
    if not colon:
        return match[0]  # scheme://user@host carries no password
    return f"{match['scheme']}{user}:{MASK}@{host}"


def redact(text: str) -> str:
    """``text`` with the password of every URL and conninfo string in it masked.

    ``redis://:s3cret@h:6379/0`` becomes ``redis://:***@h:6379/0``, ``password=s3cret``
    becomes ``password=***``; user names, hosts, ports and database names are kept, since
    they are what an operator needs to find the store. Idempotent.
    """
    text = _URL.sub(_mask_url, text)
    text = _CONNINFO.sub(lambda m: f"{m['key']}{MASK}", text)
    return _QUOTED.sub(lambda m: f"{m['key']}{m['v']}{MASK}{m['v']}", text)


class RedactingFilter(logging.Filter):
    """A handler filter that masks credentials in a record's message and traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            return True  # a malformed record: logging reports it itself when formatting
        masked = redact(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            # Formatters reuse exc_text when it is set: format the traceback once, masked.
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def install_log_redaction() -> None:
    """Put a :class:`RedactingFilter` on every handler there is now (idempotent).

    On handlers, not loggers: a logger's filters do not see records propagated from its
    children. Called again once a server has set up its own handlers (uvicorn does so
    after the CLI configured logging); ``logging.lastResort`` is included because a process
    without handlers writes warnings through it.
    """
    loggers = [logging.getLogger()]
    loggers += [
        logger
        for logger in list(logging.Logger.manager.loggerDict.values())
        if isinstance(logger, logging.Logger)
    ]
    handlers = [handler for logger in loggers for handler in logger.handlers]
    if logging.lastResort is not None:
        handlers.append(logging.lastResort)
    for handler in handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
