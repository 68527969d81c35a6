"""A dead letter's log lines say what an operator needs (the reason, the queue, the
task's name and id, the message's size, what was wrong with it), never the message's
body: a poison message may be another application's task on the queue, or a
producer's mistake, carrying a user's text. The body is kept in the dead-letter list
(``mmq dead show``), and not even there when Redis refuses it. No Redis or worker
here: the guard's checks run on a message object, the list's push is replaced."""

from __future__ import annotations

import json

import pytest
import redis

from core.broker import deadletter
from workers import poison, tasks  # noqa: F401  (tasks: registers mmq.run_job)
from workers.app import app

SECRET = "my-secret-letter-to-grandma"  # a user's text, in a message's body
TASK_ID = "5b0e7a52-7d3c-4c52-9b1e-0d4c1f6e2a11"


class Message:
    """What Celery's task handler is given: headers, a body to decode, and ack()."""

    def __init__(self, body, task: str = "mmq.run_job"):
        self.headers = {"task": task, "id": TASK_ID}
        self.body, self.content_type = body, "application/json"
        self.delivery_info = {"routing_key": "text"}
        self._raw = {"body": json.dumps(body), "headers": self.headers}
        self.acked = False

    def decode(self):
        return self.body

    def ack(self) -> None:
        self.acked = True


@pytest.fixture
def pushed(monkeypatch):
    """The dead-letter list, in memory; ``pushed.fail`` makes Redis refuse the push."""
    class Pushed(list):
        fail = False

    entries = Pushed()

    def push(client, *, max_len, **fields):
        if entries.fail:
            raise redis.ConnectionError("Error 111 connecting to redis: Connection refused")
        entries.append(deadletter.make(**fields))
        return entries[-1]

    monkeypatch.setattr(poison, "_redis", lambda: None)
    monkeypatch.setattr(deadletter, "push", push)
    return entries


def _logged(caplog) -> str:
    return "\n".join(caplog.handler.format(r) for r in caplog.records)


def _check_line(caplog, message: Message, reason: str) -> str:
    """-> the one ``dead letter:`` line, which says what it was and not what it held."""
    text = _logged(caplog)
    assert SECRET not in text, text
    lines = [r.getMessage() for r in caplog.records if "dead letter" in r.getMessage()]
    assert len(lines) == 1, lines
    size = len(json.dumps(message._raw))
    for said in ("dead letter: ", reason, "'text'", "mmq.run_job", TASK_ID, f"{size} bytes"):
        assert said in lines[0], (said, lines[0])
    return lines[0]


@pytest.mark.parametrize("task, body", [
    ("mmq.run_job", {"text": SECRET}),  # not [args, kwargs, embed]
    ("mmq.run_job", [[{"text": SECRET}], {}, {}]),  # a job id that is not a string
    ("mmq.run_job", [[SECRET, "text", "x"], {}, {}]),  # too many arguments
    ("mmq.run_jobs", [[[{"text": SECRET}]], {}, {}]),  # job ids that are not strings
])
def test_a_dead_letter_is_logged_without_the_messages_body(pushed, caplog, task, body):
    message = Message(body, task)
    handler = poison.guard_task_handler(lambda m: pytest.fail("reached Celery"),
                                        app.tasks, ())
    with caplog.at_level("INFO", logger="mmq"):
        handler(message)
    assert message.acked and len(pushed) == 1
    assert SECRET in pushed[0].raw  # the list keeps the message whole, for mmq dead show
    _check_line(caplog, message, deadletter.BAD_BODY)


def test_a_dead_letter_that_redis_refuses_is_logged_without_its_body(pushed, caplog):
    pushed.fail = True
    message = Message({"text": SECRET})
    handler = poison.guard_task_handler(lambda m: pytest.fail("reached Celery"),
                                        app.tasks, ())
    with caplog.at_level("INFO", logger="mmq"):
        handler(message)
    assert message.acked and pushed == []
    line = _check_line(caplog, message, deadletter.BAD_BODY)
    assert "not stored" in line and "Connection refused" in line, line
