"""``serve --workers N``: the supervisor that runs N gateway processes on one port, and the
group's admin listener that merges their answers."""
