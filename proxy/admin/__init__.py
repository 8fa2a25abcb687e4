"""The admin listener's app: the token API, the status pages, the OpenAPI document, and the
token operations the API and the command line share."""
