"""What a model's KV cache may carry besides keys and values: per-row tensors [B, ...] under one attribute, which
the batch (generation/batch.py) keeps aligned with the cache's rows as requests join and leave."""

ROW_STATE = "row_state"
