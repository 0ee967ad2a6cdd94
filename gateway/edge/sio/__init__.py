"""The socket.io edge: the /agent, /visitor and /board namespaces and the manager that carries
their emits between nodes."""
