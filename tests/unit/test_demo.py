"""``farm demo`` keeps the terminal quiet: warnings raised in its own process go to its log file."""

from __future__ import annotations

import io
import logging
import warnings

import pytest

from farm.demo import warnings_to


def test_warnings_and_library_log_records_go_to_the_log_not_stderr(capsys):
    log = io.StringIO()
    with warnings.catch_warnings(), warnings_to(log):
        warnings.simplefilter("always")  # whatever -W says
        warnings.warn("a library is unhappy", UserWarning)
        logging.getLogger("some.library").warning("something to look at later")
    with pytest.warns(UserWarning, match="after the demo"):  # back to normal afterwards
        warnings.warn("after the demo", UserWarning)
    text = log.getvalue()
    assert "a library is unhappy" in text and "something to look at later" in text
    assert "after the demo" not in text
    err = capsys.readouterr().err
    assert "a library is unhappy" not in err and "something to look at later" not in err
    assert all(getattr(h, "stream", None) is not log for h in logging.getLogger().handlers)
