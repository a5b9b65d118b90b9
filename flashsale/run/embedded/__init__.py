"""Real Redis and PostgreSQL started as child processes (development, tests)."""
