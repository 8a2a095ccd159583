"""The client: local embeddings and head, remote spans, inference sessions, generation."""
