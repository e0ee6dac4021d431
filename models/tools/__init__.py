"""Tool-call formats: how each model family is told about tools, and how its calls are read back out of its answer.
One module per format; `formats.py` names them for `--tool-call-parser`."""
