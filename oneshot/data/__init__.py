"""Text shipped with oneshot so that it runs with no network: see README.md here."""
