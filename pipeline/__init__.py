"""Data: raw dataset parsers, the shard format, the identity sampler and the loaders."""
