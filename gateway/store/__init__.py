"""Where state lives: the embedded store for one node, Redis for many (see base.Store)."""

from gateway.store.base import CallRow, EventHandler, ResyncHandler, Store, StoreHealth

__all__ = ["CallRow", "EventHandler", "ResyncHandler", "Store", "StoreHealth"]
