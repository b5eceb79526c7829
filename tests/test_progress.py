"""The shared progress bar: an ETA on a terminal, nothing in a log, nothing off the first rank."""

import io

from densecl_bench.progress import bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_bar_with_an_eta_and_a_log_gets_nothing():
    tty, log = _Terminal(), io.StringIO()
    assert list(bar(range(3), desc="extract voc07_test", unit="img", file=tty)) == [0, 1, 2]
    assert list(bar(range(3), desc="extract voc07_test", unit="img", file=log)) == [0, 1, 2]
    shown = tty.getvalue()
    assert "extract voc07_test" in shown and "3/3" in shown and "<00:00" in shown  # elapsed<remaining
    assert log.getvalue() == ""


def test_forced_on_or_off_and_quiet_off_the_first_rank(monkeypatch):
    forced = io.StringIO()
    list(bar(range(2), desc="svm", file=forced, progress=True))
    assert "2/2" in forced.getvalue()
    off = _Terminal()
    list(bar(range(2), desc="svm", file=off, progress=False))
    assert off.getvalue() == ""
    monkeypatch.setenv("RANK", "1")  # torchrun's second process: one voice per job
    other = _Terminal()
    list(bar(range(2), desc="svm", file=other, progress=True))
    assert other.getvalue() == ""
