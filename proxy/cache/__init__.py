"""Budget savers (SPEC §5): the response cache, the in-flight GETs identical callers share,
and what a write purges. ``keys``, ``control``, ``store`` and ``purge`` are pure (clock and
data passed in); ``flights`` holds the shared in-flight answers; ``channel`` carries purges
to the other workers and replicas. The request's step through them is
proxy/gateway/cached.py."""
