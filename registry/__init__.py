"""The MLflow Model Registry: registering candidates, the quality gate, aliases, rollback (`store.py` talks to MLflow)."""
