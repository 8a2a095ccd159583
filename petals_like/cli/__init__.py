"""Command-line entry points: run_dht, run_server, demo, bench, make_tiny_model."""
