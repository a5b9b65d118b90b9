"""Running it: the CLI, the runtime wiring, embedded servers for development."""
