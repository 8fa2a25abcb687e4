"""What operators read: Prometheus metrics, the JSON logs, request ids."""
