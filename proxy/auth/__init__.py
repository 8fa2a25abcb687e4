"""Who is calling and what it may do: the token format and its hashing, the authenticator
and its cache, routes and scopes, and the per-client throttle of failed authentications."""
