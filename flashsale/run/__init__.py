"""Running flashsale: the CLI, the runtime, roles and the embedded servers."""
