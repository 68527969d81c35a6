"""The results page, ``/ui``: server-rendered pages served by the API process.

routes.py holds the pages (``router``, which ``producer.api.create_app`` includes);
pages.py how a page is drawn and the error pages (``ui_error_page``, the app's handler
for ``UiError``, and ``store_error_page``, its answer to a database error on a page);
session.py the signed sign-in cookie; data.py what the pages read
from SQL; templates/ and static/ what they are drawn with.
"""

from producer.ui.pages import UiError, is_page, store_error_page, ui_error_page
from producer.ui.routes import router

__all__ = ["UiError", "is_page", "router", "store_error_page", "ui_error_page"]
