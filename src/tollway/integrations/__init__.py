"""Drop-in billing for gateways built on other projects, through the SDK (:mod:`tollway.client`) only.

An integration talks to a tollway service over HTTP, so any number of gateway replicas share one
tollway; it never imports the engine (an import-linter contract says so). Each integration is an
optional extra: ``pip install 'tollway[litellm]'`` for :mod:`tollway.integrations.litellm`.
"""
