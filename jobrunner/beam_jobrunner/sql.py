"""The export query: one window of one table, optionally filtered, in Snowflake SQL.

Identifiers are validated against the model's patterns (plain Snowflake identifiers: letters,
digits, `_` and `$`, not starting with a digit) and then spliced *unquoted*. Unquoted names
resolve case-insensitively in Snowflake, exactly as a user who typed `base.assets.x` expects;
quoting them would make them case-sensitive and turn `erc20_token_transfers` into a different
table from `ERC20_TOKEN_TRANSFERS`. The patterns leave no room for quotes, spaces, `;`, `--`,
dots inside a part or non-ASCII letters, so a validated name cannot change the statement.

Values (window bounds, filter values) are bound parameters (qmark) for the `fetch` strategy.
For `unload` they are rendered as literals by `literal()`: COPY INTO <location> runs the query
inside Snowflake's unload machinery, and Snowflake documents binding for queries and DML but
not for a COPY's source subquery, so we do not depend on it. Literals are escaped strictly
(backslash and quote, both of which Snowflake's single-quoted strings interpret) and tested
with hostile values parsed back by sqlglot's Snowflake dialect.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from beam_contract.model import IDENT_RE, TABLE_RE, BackfillWindow, Filter
from beam_jobrunner.errors import PermanentError

# The window's partition_key names a concept; the column that holds it in the provider's tables.
PARTITION_COLUMNS = {"block_timestamp": "block_timestamp", "block": "block_number"}

# A stage-relative path segment (namespace, job id): no quotes, spaces or slashes.
_PATH_SEGMENT_RE = r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}"


def ident(name: str, what: str = "column") -> str:
    # fullmatch: the model's `$` anchor would also accept a trailing newline under re.match.
    if not isinstance(name, str) or not re.fullmatch(IDENT_RE.strip("^$"), name):
        raise PermanentError(f"staging: {what} {name!r} is not a plain identifier (letters, digits, _ and $)")
    return name


def table_name(name: str) -> str:
    if not isinstance(name, str) or not re.fullmatch(TABLE_RE.strip("^$"), name):
        raise PermanentError(f"staging: table {name!r} is not a plain [database.][schema.]table name")
    return name


def path_segment(value: str, what: str) -> str:
    # The stage path is unquoted SQL text: `--` would start a comment (valid in a k8s name, though).
    if not re.fullmatch(_PATH_SEGMENT_RE, value or "") or "--" in value:
        raise PermanentError(f"staging: {what} {value!r} cannot be part of a stage path")
    return value


def ts_param(dt: datetime) -> str:
    """A window bound as Snowflake TIMESTAMP_NTZ text: the table stores UTC without a zone."""
    return dt.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")


def literal(value) -> str:
    """A value as a Snowflake SQL literal; only int, str and the window's timestamps occur."""
    if isinstance(value, bool):  # bool is an int subclass; the model never produces one
        raise PermanentError(f"staging: unsupported filter value {value!r}")
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, str):
        if "\x00" in value:
            raise PermanentError("staging: filter values may not contain NUL characters")
        # Snowflake's single-quoted strings treat backslash as an escape: double it, then quotes.
        return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"
    raise PermanentError(f"staging: unsupported filter value of type {type(value).__name__}")


@dataclass
class Query:
    sql: str
    params: list = field(default_factory=list)


class Source(Protocol):
    """What the export query reads of a spec: a BackfillSpec, or a PreviewSpec (the same fields)."""

    table: str
    backfill_window: BackfillWindow
    filter: Filter | None
    columns: list[str] | None


def _where(spec: Source, bind) -> str:
    """<partition> >= start AND < end [AND col IN (...)], each value through bind()."""
    window = spec.backfill_window
    part = PARTITION_COLUMNS[window.partition_key]
    start, end = window.bounds()
    if window.partition_key == "block_timestamp":
        lo, hi = bind(ts_param(start), "TIMESTAMP_NTZ"), bind(ts_param(end), "TIMESTAMP_NTZ")
    else:
        lo, hi = bind(int(start)), bind(int(end))
    where = f"{part} >= {lo} AND {part} < {hi}"
    if spec.filter is not None:
        values = ", ".join(bind(v) for v in spec.filter.values)
        where += f" AND {ident(spec.filter.column, 'filter column')} IN ({values})"
    return where


def _binder(params: list, inline: bool):
    def bind(value, cast: str | None = None) -> str:
        if inline:
            text = literal(value)
        else:
            params.append(value)
            text = "?"
        return f"CAST({text} AS {cast})" if cast else text

    return bind


def select_query(spec: Source, *, inline: bool = False) -> Query:
    """SELECT <columns> FROM <table> WHERE <partition> >= start AND < end [AND col IN (...)].

    inline=False gives qmark placeholders and params; inline=True renders literals (unload).
    `spec` is a BackfillSpec or anything with its source fields (a PreviewSpec).
    """
    cols = ", ".join(ident(c) for c in spec.columns) if spec.columns else "*"
    table = table_name(spec.table)
    params: list = []
    where = _where(spec, _binder(params, inline))
    return Query(f"SELECT {cols} FROM {table} WHERE {where}", params)


def count_query(spec: Source) -> Query:
    """SELECT COUNT(*) over select_query()'s table and WHERE (its rows: what staging exports)."""
    table = table_name(spec.table)
    params: list = []
    where = _where(spec, _binder(params, inline=False))
    return Query(f"SELECT COUNT(*) FROM {table} WHERE {where}", params)


def first_rows_query(spec: Source, limit: int) -> Query:
    """select_query()'s rows, the first `limit` of them in partition order.

    Staging's SELECT has no ORDER BY (its chunks hold the rows in whatever order Snowflake
    returns them); the rows a user calls "the first" are the window's earliest, by its
    partition column (which need not be among the projected columns).
    """
    q = select_query(spec)
    part = PARTITION_COLUMNS[spec.backfill_window.partition_key]
    return Query(f"{q.sql} ORDER BY {part} LIMIT {int(limit)}", q.params)


def unload_sql(spec: Source, stage: str, path: str, max_file_size: int) -> str:
    """COPY INTO @stage/path/ FROM (window query) as parquet files of at most max_file_size."""
    stage = table_name(stage)  # [db.][schema.]stage: the same shape as a table name
    segments = [path_segment(s, "stage path segment") for s in path.strip("/").split("/")]
    query = select_query(spec, inline=True).sql
    return (
        f"COPY INTO @{stage}/{'/'.join(segments)}/ FROM ({query}) "
        f"FILE_FORMAT = (TYPE = PARQUET) HEADER = TRUE MAX_FILE_SIZE = {int(max_file_size)}"
    )


_QUERY_ID_RE = re.compile(r"^[0-9a-fA-F-]{16,64}$")


def cancel_sql(query_id: str) -> str:
    """Cancel a running statement by the id Snowflake gave it (SYSTEM$CANCEL_QUERY)."""
    if not _QUERY_ID_RE.match(query_id or ""):
        raise PermanentError(f"staging: {query_id!r} is not a Snowflake query id")
    return f"SELECT SYSTEM$CANCEL_QUERY('{query_id}')"


def list_sql(stage: str, path: str) -> str:
    segments = [path_segment(s, "stage path segment") for s in path.strip("/").split("/")]
    return f"LIST @{table_name(stage)}/{'/'.join(segments)}/"
