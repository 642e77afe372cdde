"""Passwords out of text: URLs and conninfo strings in messages, run records and logs."""

from __future__ import annotations

import re

_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)[^@\s]*@")
_CONNINFO_PASSWORD = re.compile(r"(?P<head>\bpassword\s*=\s*)('[^']*'|\S+)", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with the password of every URL and ``password=`` pair replaced by ``***``."""
    text = _URL_PASSWORD.sub(r"\g<head>***@", text)
    return _CONNINFO_PASSWORD.sub(r"\g<head>***", text)
