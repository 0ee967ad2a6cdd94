"""The pure rules: presence, routing, hours, call and callback transitions, phone policy,
ringing, admission, and the errors a request is refused with (``errors``). No I/O and no
clock of its own (every rule takes ``now``); imports only the core itself and
``phonenumbers`` (an import-linter contract in pyproject.toml)."""
