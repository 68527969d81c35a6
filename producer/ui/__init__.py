"""The results page, ``/ui``: server-rendered pages served by the API process.

routes.py holds the pages (``router``, which ``producer.api.create_app`` includes);
pages.py how a page is drawn and the error page (``ui_error_page``, the app's handler
for ``UiError``); session.py the signed sign-in cookie; data.py what the pages read
from SQL; templates/ and static/ what they are drawn with.
"""

from producer.ui.pages import UiError, ui_error_page
from producer.ui.routes import router

__all__ = ["UiError", "router", "ui_error_page"]
