"""The HTTP front (aiohttp): app factory, middleware, routes."""
