"""The client's view of the swarm and its choice of a chain of servers."""
