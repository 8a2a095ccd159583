"""Local swarms, process helpers, oracles and the network test bed, for the demo, the bench, the tests and
scripts/: the library itself (client, server, routing, DHT) never imports this package."""
