"""The API's routers, one per concern: health (liveness, readiness), inference (/v1/*), metrics (Prometheus)."""
