"""State in one SQLite file, shared by the worker processes of one gateway: the file itself
(``connection.py``: opening, schema, transactions), the token store (``tokens.py``) and the
budget's send log (``sends.py``)."""
