"""A volunteer server: hosts a span of blocks, serves forward/backward/inference, keeps sessions' KV caches."""
