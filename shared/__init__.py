"""Code every tierserve process shares: protocol, config, GGUF reading, model math, tokenizer."""
