"""The edges: authenticate, validate through the codec, call a service, encode the answer.
``http`` (REST, SSE) and ``sio`` (socket.io) never import each other; what both need (tokens,
visitor identities, ICE servers, how each error is answered) lives here."""
