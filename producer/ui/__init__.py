"""The results page, ``/ui``: server-rendered pages served by the API process."""
