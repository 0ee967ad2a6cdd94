"""What keeps a node running and observable: task ownership, metrics, load measurement, rate
limits, the collector pacer."""
