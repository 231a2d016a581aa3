"""Watching a worker in production: Prometheus metrics and a health check (``prorch worker
--metrics-port``, extra ``prorch[metrics]``)."""
