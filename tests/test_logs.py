"""The rate-limited log: what it holds back is counted, and placed in time truly."""

from __future__ import annotations

import logging
import re
import time

import pytest

from transport.logs import RateLimitedLog


def test_the_count_of_held_back_warnings_says_when_they_were_held_back(caplog: pytest.LogCaptureFixture) -> None:
    # The count is logged with the next warning after the interval, which may come long after:
    # "in the last 0.2 s" would place warnings held back a second ago in a time with none.
    logger = logging.getLogger("test_logs.held_back")
    limited = RateLimitedLog(logger, burst=1, interval_s=0.2)
    with caplog.at_level(logging.WARNING, logger=logger.name):
        for _ in range(3):
            limited.warning("refused %d", 1)
        time.sleep(1.2)
        limited.warning("refused %d", 2)
    messages = [record.getMessage() for record in caplog.records]
    assert messages[0] == "refused 1"
    found = re.fullmatch(r"2 similar warnings suppressed between (\d+) and (\d+) s ago", messages[1])
    assert found is not None, messages[1]
    assert int(found[1]) >= int(found[2]) >= 1  # held back over a second before this line
    assert messages[2] == "refused 2"
