"""The services that apply the core's rules to the store: presence, calls, callbacks, timers,
cross-node events, drain. None imports a transport or a provider."""
