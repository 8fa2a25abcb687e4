"""echowin's budget, kept locally: the pure rolling-window math and rate-limit headers, the
admission seam the handler calls, the slots a send takes, and the scheduler that queues
fairly across tokens."""
