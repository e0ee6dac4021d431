"""The doors (`api/`) and the SSE writer (`sse.py`)."""
