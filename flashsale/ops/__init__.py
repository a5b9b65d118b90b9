"""Operating the service: metrics, logs, live figures, heartbeats, status."""
