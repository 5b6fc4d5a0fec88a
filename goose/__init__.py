"""goose: an RWKV-7 toolkit."""
