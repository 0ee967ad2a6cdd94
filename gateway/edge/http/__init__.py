"""The aiohttp edge: REST for agents and visitors, callbacks, the availability feed, static
files, and the typed app keys its handlers find the services under."""
