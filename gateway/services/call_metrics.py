"""The manager's figures in Prometheus (gateway/core/call_figures.py): every call this node
stores adds what its change means (a call made or ended, a first human reached, a callback
on time or late), and every answer to the question after the call its group. Each node
counts the changes it made, so the sum over nodes counts each change once."""

from __future__ import annotations

from gateway.core.call import Call
from gateway.core.call_figures import figures
from gateway.ops.metrics import Metrics


class CallMetrics:
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def changed(self, before: Call | None, after: Call) -> None:
        seen = figures(before, after)
        site, channel = after.site, after.channel.value
        m = self._metrics
        if seen.started:
            m.calls_started.labels(site, channel).inc()
        if seen.ended is not None:
            m.calls_ended.labels(site, channel, seen.ended).inc()
        if seen.to_first_human_s is not None:
            m.time_to_first_human.labels(site, channel).observe(seen.to_first_human_s)
        if seen.callback_late_s is not None:
            m.callback_lateness.labels(site).observe(max(0.0, seen.callback_late_s))

    def answered(self, site: str, group: str) -> None:
        self._metrics.survey_answers.labels(site, group).inc()
