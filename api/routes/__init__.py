"""One router per resource (FastAPI full-stack template style)."""
