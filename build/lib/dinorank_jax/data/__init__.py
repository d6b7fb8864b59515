"""Data: tokenizer, record format, corpus builders and the Grain pipeline (method §7)."""
