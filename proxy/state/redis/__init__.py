"""State in Redis, shared by every replica: the client (``client.py``), the token store
(``tokens.py``) and the upstream budget (``slots.py``, its background in ``link.py``, with
its Lua in ``proxy/state/lua``).

Keys, for credential (or token quota) ``c`` and prefix ``p`` (``redis.key_prefix``):
``p{c}:sends`` (sorted set, score = Redis time of the send, member = ``replica:seq``, or
``replica:seq|class`` for a send of a class of service: ``proxy/state/lua/classes.lua``),
``p{c}:ext:{i}`` (external sends counted in window ``i``), ``p{c}:frozen`` (Redis time
until which nothing may be sent), ``p{c}:epoch`` (set by the first reservation a Redis
sees: another one means it lost its data) and ``p{c}:line`` (hash: the replicas waiting for
the next free slot, ``proxy.budget.slots.Line``). A freeze is also published on the channel
``p{c}:freezes`` (``"<replica> <Redis time>"``), so that the other replicas refuse their
waiters at once. Tokens: ``ptoken:{id}``, ``ptokens`` and the name
indexes ``ptokens:name:{name}`` and ``ptokens:names`` (``tokens.py``). On a cluster
every key of ``c`` carries the hash tag ``{c}`` (``p{c}:sends`` with the braces kept), so
each script touches one slot; the token keys the tag ``{tokens}`` (``scripts.hash_tagged``).

This package's ``__init__`` imports nothing: ``fallback.py`` and ``view.py`` are pure.
"""
