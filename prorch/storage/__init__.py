"""Storage: records in and out of a backend, one transition as one unit. The repository interface
a user implements (``repository``), the backend contract at the engine's verbs (``backend``), the
adapter that wraps a user's four-method repository (``seed_adapter``), the shared implementation
the shipped backends build on (``composed``, ``commits``), URL resolution (``urls``), the typed
facade the engine calls (``store``), and what is built on it: ``creation``, ``listing``,
``results``, ``outside`` (messages and cancel requests), ``leases`` and ``purge`` (retention's delete)."""
