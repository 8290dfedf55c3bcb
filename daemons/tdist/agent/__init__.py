"""The per-node agent: reads ``agent.toml``, runs supervisord as its child and one supervised
process per worker instance (pinned to its GPUs and, where known, the GPUs' NUMA CPUs)."""
