"""The HTTP server (FastAPI + uvicorn) that serves the registered model, and its inference engine."""
