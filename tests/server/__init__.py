"""The server as a user starts it (`server.py`): command line, start-up and shutdown, the bundled model, layers."""
