"""Brokers: how the API hands jobs to the models.

    broker = make_broker(settings, registry)    # embedded without settings.redis_url
    await broker.start()
    result = await broker.submit(Job(model, task, payload, params, deadline))

Payloads and results (numpy arrays; the API builds payloads, the executor consumes them):

    tokenize     payload {"images": float32 (n,3,S,S) in [-1,1], "n": n}
                 result  {"tokens": float32 (n,L,D), "indices": int64 (n,G,L/G)}
    reconstruct  payload {"images": ..., "n": n}
                 result  {"images": uint8 (n,S,S,3), "psnr": [float]*n}
    decode       payload {"tokens": float32 (n,L,D), "n": n}
                 result  {"images": uint8 (n,S,S,3)}
    generate     payload {"labels": [int]*n, "seeds": [int]*n, "cfg_scale": float, "n": n}
                 params  {"steps", "sampler", "guidance_interval": [lo, hi], "path"}
                 result  {"images": uint8 (n,S,S,3)}
"""

from __future__ import annotations

from ..registry import ModelRegistry
from ..settings import Settings
from .base import Broker
from .inprocess import InProcessBroker


def make_broker(settings: Settings, registry: ModelRegistry) -> Broker:
    """InProcessBroker when ``settings.redis_url`` is unset (model in this process), else
    RedisBroker (this process only queues jobs; ``softvq worker`` processes run them)."""
    if settings.redis_url:
        from .redis_streams import RedisBroker

        return RedisBroker(settings, registry)
    return InProcessBroker(settings, registry)


__all__ = ["Broker", "InProcessBroker", "make_broker"]
