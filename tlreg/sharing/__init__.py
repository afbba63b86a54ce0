"""Sharing trained models: artifacts, exporters and the Hub, one concept a module.

From the top down (each imports only those below it; `lint-imports` checks it): `api` (the
front door: a run, a folder or a Hub repo), `inspect`, `exporters` and `hub`, `load` and `save`,
`card`, `format`. Nothing is re-exported here: import from the module that defines a name.
"""
