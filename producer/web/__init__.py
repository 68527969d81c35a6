"""What the HTTP API and the results page share: API keys, size-capped request bodies."""
