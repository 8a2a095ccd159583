"""The swarm health dashboard: what the swarm serves, which blocks are thin, which servers are slow or gone.

state.py builds the view (a pure function of DHT records and probe results), reader.py reads the
swarm, service.py refreshes in the background and keeps the history, metrics.py renders Prometheus
text, web.py serves the page, the JSON API and the metrics, terminal.py draws the same view with rich.
"""
