"""What the router tells its operators: Prometheus metrics, the access log, Sentry, and how
late its own event loop runs."""
