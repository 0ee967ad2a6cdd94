"""The media worker's HTTP paths, shared by the worker and the node's pool (which must not
import the worker: that would load aiortc into every gateway node)."""

from typing import Final

SESSIONS: Final = "/v1/media/sessions"
STATS: Final = "/v1/media/stats"
HEALTH: Final = "/v1/media/health"
