"""Registry locations: a SQLite file path or a PostgreSQL URL, and how to show one safely."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
MASK = "********"


def is_postgres(location: object) -> bool:
    return str(location).lower().startswith(POSTGRES_SCHEMES)


def redact(location: object) -> str:
    """The location with any password replaced by a mask (in the authority part and in a
    `password=` query parameter), for logs, errors and `config show`."""
    text = str(location)
    if "://" not in text:  # a file path
        return text
    try:
        parts = urlsplit(text)
    except ValueError:
        return re.sub(r"//[^@/]*@", f"//{MASK}@", text)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hosts = netloc.rpartition("@")
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":" + MASK
        netloc = f"{userinfo}@{hosts}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, MASK if k.lower() == "password" else v) for k, v in pairs])
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
