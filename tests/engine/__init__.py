"""The engine (`engine.py`): batching, and no client stalling the others."""
