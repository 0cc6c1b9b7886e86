"""Models in memory: load base and tokenizer (16-bit or 4-bit), read and check adapter folders, generate."""
