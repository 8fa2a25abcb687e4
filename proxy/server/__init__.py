"""How connections are taken: the listeners, the proxy listener's lobby, the connection
guard (head timeout, bounds), event loops, and a worker process's side of the group."""
