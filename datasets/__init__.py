"""One module per dataset that `prepare_data.py` writes: `common` (the shared Task container,
writers, manifest, statistics and prepared cache), `synthetic`, `movielens` (ml-100k, ml-25m),
`ttl` (the real files) and `ttl_shape` (synthetic data with TTL's published shapes)."""
