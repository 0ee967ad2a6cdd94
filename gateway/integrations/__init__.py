"""Integrations a company runs beside the gateway: separate processes that talk to it over
its public, signed interfaces only. They import nothing of the server but ``gateway.wire``
(an import-linter contract in pyproject.toml holds this)."""
