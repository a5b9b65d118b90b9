"""Development server topologies (not used by the service itself)."""
