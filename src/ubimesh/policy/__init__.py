"""Authorization policy: the RBAC engine (``rbac``) that the proxy runs per connection and per
request, and that ``ubimesh policy`` runs to answer questions about a mesh (docs/policy.md)."""
