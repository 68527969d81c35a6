"""What the HTTP API and the results page share, so neither imports the other: API
keys and callers (auth.py), the error shape and status map (errors.py), size-capped
request bodies and multipart uploads (form.py), and the submit service (submit.py)."""
