"""hopscope: per-request hop-latency profiler for small Kubernetes clusters."""

__version__ = "0.1.0"
