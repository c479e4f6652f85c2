import io

from indexer.core.bars import LOG_INTERVAL_S, progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_in_a_log_redraws_at_most_every_30_seconds() -> None:
    log = io.StringIO()
    with progress_bar(total=10_000, file=log) as bar:
        assert bar.mininterval == LOG_INTERVAL_S == 30.0
        for _ in range(10_000):
            bar.update(1)
    # the first draw and the last, nothing between
    assert log.getvalue().count("\r") <= 3
    assert "10000/10000" in log.getvalue()


def test_a_bar_on_a_terminal_stays_live() -> None:
    with progress_bar(total=1, file=_Terminal()) as bar:
        assert bar.mininterval < 1
