"""The REST API: aiohttp app, routes, agent reports, wire views and the OpenAPI document."""
