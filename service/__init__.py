"""softvq-serve's HTTP service, batching, brokers and workers."""
