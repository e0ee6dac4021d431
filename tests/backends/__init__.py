"""The backends (`backends/`): the upstream proxy; the local backend is tested through the doors."""
