"""Membrane gateway: presence, routing, call sessions and their HTTP and socket.io edges."""
