"""Generation (`generation/`): attention, the KV cache, the plain decode step, the scheduler, text out."""
