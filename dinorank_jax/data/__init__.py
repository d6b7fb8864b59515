"""Data: tokenizer, record format, corpus builders and the Grain pipeline (SPEC §7)."""
