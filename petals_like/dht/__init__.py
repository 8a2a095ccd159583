"""The swarm's shared directory: who serves which blocks of which model, and how fast."""
