"""The results page, ``/ui``: server-rendered pages served by the API process.

routes.py holds the pages (``router``, which ``producer.api.create_app`` includes, and
``ui_error_page``, its handler for ``UiError``); session.py the signed sign-in cookie;
data.py what the pages read from SQL; templates/ and static/ what they are drawn with.
"""

from producer.ui.routes import UiError, router, ui_error_page

__all__ = ["UiError", "router", "ui_error_page"]
