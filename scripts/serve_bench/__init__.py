"""The pieces of scripts/bench_serve.py: stats, datasets, client, report, launch."""
