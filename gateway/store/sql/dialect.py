"""What differs between the SQL engines the registry runs on, said once per engine."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ... import times

_NUMBERED = re.compile(r"\$(\d+)")


class _Spelling:
    """A token of the SQL text (`{name}` or `{name:argument}`) spelled by a function of its
    argument (str.format hands the part after the colon to __format__)."""

    def __init__(self, spell: Callable[[str], str]) -> None:
        self._spell = spell

    def __format__(self, argument: str) -> str:
        return self._spell(argument)


@dataclass(frozen=True)
class Dialect:
    """One engine's spelling of what the statements in gateway/store/sql/ leave open.

    Statements are written once, with PostgreSQL's numbered placeholders ($1, $2: a value
    used twice is named twice, never passed twice) and these tokens:

    - `{bytes}`: after an ORDER BY on a name, byte order whatever the locale;
    - `{lock}` / `{lock:k}`: FOR UPDATE (OF k), row locks where the engine has them;
    - `{skip:d}`: lock the row of d chosen by a claim, skipping rows others lock;
    - `{lines:expr}`: the values of expr in a group, one per line;
    - `{json:column.key}`: the text of a JSON object's top-level key;
    - `{ids:$n}` / `{texts:$n}`: "is one of the array passed as $n" (see `array`);
    - `{clock}`: the leases' clock in seconds; `{stale}`: "a lease not renewed within $1
      seconds of it" (or renewed ahead of it, where it restarts with the machine).

    The text is read as str.format reads it: a literal brace in a statement is doubled.
    Values never enter the text: they go as parameters.
    """

    name: str
    placeholder: str  # "$" or "?": SQLite reads ?1 as its first value, as PostgreSQL $1
    collate_bytes: str
    row_lock: str
    skip_locked: str
    lines: str  # a format string of "expr"
    json_text: str  # a format string of "column" and "key"
    in_ids: str  # a format string of "param"
    in_texts: str
    clock: str
    stale: str
    _cache: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def sql(self, text: str) -> str:
        """The statement as this engine reads it (cached: statements are constants)."""
        found = self._cache.get(text)
        if found is None:
            spelled = text.format_map(self._tokens())
            if self.placeholder != "$":
                spelled = _NUMBERED.sub(lambda m: self.placeholder + m.group(1), spelled)
            found = self._cache[text] = spelled
        return found

    def _tokens(self) -> dict[str, Any]:
        def lock(alias: str) -> str:
            if not self.row_lock:
                return ""
            return f"{self.row_lock} OF {alias}" if alias else self.row_lock

        return {
            "bytes": self.collate_bytes,
            "lock": _Spelling(lock),
            "skip": _Spelling(lambda alias: self.skip_locked.format(alias=alias)),
            "lines": _Spelling(lambda expr: self.lines.format(expr=expr)),
            "json": _Spelling(self._json),
            "ids": _Spelling(lambda param: self.in_ids.format(param=param)),
            "texts": _Spelling(lambda param: self.in_texts.format(param=param)),
            "clock": self.clock,
            "stale": self.stale.format(clock=self.clock),
        }

    def _json(self, path: str) -> str:
        column, _, key = path.rpartition(".")
        return self.json_text.format(column=column, key=key)

    def time(self, value: datetime | str | None) -> Any:
        """A time as a statement's value: an aware datetime, or text where times are text."""
        if value is None:
            return None
        moment = value if isinstance(value, datetime) else times.parse(value)
        return times.text(moment) if self.name == "sqlite" else moment

    def array(self, values: Sequence[int | str]) -> Any:
        """A list as one statement value, for `{ids:$n}` and `{texts:$n}`."""
        return json.dumps(list(values)) if self.name == "sqlite" else list(values)


SQLITE = Dialect(
    name="sqlite",
    placeholder="?",
    collate_bytes="",  # BINARY, SQLite's default collation, is byte order
    row_lock="",  # a write transaction holds the whole database (BEGIN IMMEDIATE)
    skip_locked="",
    lines="group_concat({expr}, char(10))",
    json_text="json_extract({column}, '$.{key}')",
    in_ids="IN (SELECT value FROM json_each({param}))",
    in_texts="IN (SELECT value FROM json_each({param}))",
    # The machine's boot clock (a function the driver registers): the same for all its
    # processes, never stepped; a renewal ahead of it was made before a reboot.
    clock="gateway_clock()",
    stale="(seen_at < {clock} - $1 OR seen_at > {clock} + 1)",
)

POSTGRES = Dialect(
    name="postgresql",
    placeholder="$",
    collate_bytes=' COLLATE "C"',
    row_lock="FOR UPDATE",
    skip_locked="FOR UPDATE OF {alias} SKIP LOCKED",
    lines="string_agg({expr}, chr(10))",
    json_text="({column}::jsonb ->> '{key}')",
    in_ids="= ANY({param}::bigint[])",
    in_texts="= ANY({param}::text[])",
    # The database's clock judges every node: theirs need not agree.
    clock="extract(epoch FROM clock_timestamp())",
    stale="seen_at < {clock} - $1",
)
