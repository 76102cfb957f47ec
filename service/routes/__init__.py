"""HTTP routes, one module per resource: ``segment`` (POST /segment) and ``ops`` (health, readiness, info,
metrics)."""
