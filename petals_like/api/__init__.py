"""An OpenAI-compatible HTTP API over the swarm (python -m petals_like.cli.api_server)."""
