"""Storage: the backend contract at the engine's verbs (``backend``), the adapter that wraps a
user's four-method repository (``seed_adapter``), the shared implementation the shipped
backends build on (``composed``), and URL resolution (``urls``)."""
