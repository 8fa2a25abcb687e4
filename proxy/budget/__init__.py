"""echowin's budget, kept locally: the admission seam the handler calls (``admission``); the
pure window math (``windows``, ``window_log``), fairness between tokens (``fairness``) and
rate-limit headers (``ratelimit_headers``); a credential's lane (``lane``, ``refusals``,
``dispatch``, ``grants``); per-token quotas (``quotas``); the slots a send takes (``slots``,
``local_slots``); and the scheduler that glues quota and lane (``scheduler``)."""
