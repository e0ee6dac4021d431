"""Models (`models/`): loading, GGUF, precision, kernels, the ChatGLM families, CUDA."""
