"""Chaos tests: real worker processes killed, Redis restarted, S3 throttled, the catalog cut off.

Marker ``chaos`` (``make test-chaos``); each test is bounded in time.
"""
