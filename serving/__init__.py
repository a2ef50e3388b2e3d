"""The HTTP server (FastAPI + uvicorn) that serves the registered model; its inference engine is `inference`."""
