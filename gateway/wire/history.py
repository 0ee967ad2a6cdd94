"""The call history as the operator exports it: one day of a site's calls as CSV
(``GET /v1/sites/{site}/history.csv?day=YYYY-MM-DD``)."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime

from gateway.core.errors import Invalid
from gateway.core.history import HistoryRow
from gateway.wire.base import iso

CSV_COLUMNS = (
    "call_id",
    "channel",
    "outcome",
    "reason",
    "agent_id",
    "branch",
    "created_at",
    "connected_at",
    "ended_at",
    "to_first_human_s",
    "survey_score",
)


def history_day_from_query(query: Mapping[str, str]) -> float:
    """The start (POSIX seconds) of the UTC day ``?day=`` names; 400 for anything else."""
    raw = query.get("day", "")
    try:
        day = date.fromisoformat(raw) if len(raw) == 10 else None
    except ValueError:
        day = None
    if day is None:
        raise Invalid("day must be a date, YYYY-MM-DD")
    return datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()


def history_to_csv(rows: Sequence[HistoryRow]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        wait = r.to_first_human_s
        writer.writerow(
            (
                r.call_id,
                r.channel,
                r.outcome,
                r.reason or "",
                r.agent_id or "",
                r.branch or "",
                iso(r.created_at),
                iso(r.connected_at) or "",
                iso(r.ended_at) or "",
                "" if wait is None else f"{wait:.3f}",
                "" if r.survey_score is None else r.survey_score,
            )
        )
    return out.getvalue()
