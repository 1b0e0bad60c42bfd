"""Kept for compatibility with twat-mp 2.x: ``from twat_mp.async_mp import ...`` keeps
working. New code should import from ``twat_mp`` directly."""

from twat_mp.aio import AsyncMultiPool, apmap

__all__ = ["AsyncMultiPool", "apmap"]
