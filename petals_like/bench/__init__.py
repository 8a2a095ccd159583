"""The standard benchmark's workloads (`python -m petals_like.cli.bench` runs them and prints JSON).

harness.py holds what every workload shares: token timers and summaries, the bench swarm (BenchSwarm, a
LocalSwarm with a client) and the in-process session (LocalSession); baseline.py (a)-(c), engine.py
(d)-(g), routing.py (h)-(j), quant.py (k), (l), finetune.py (m) and network.py (n) hold the workloads,
importing only the harness and the library; workloads.py is the table of them (letter, report key, what
each needs, the function to call) that the CLI loops over. See docs/benchmarks.md.
"""
