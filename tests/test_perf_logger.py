"""Logs that read well in a batch system's output: rank prefixes, quiet non-zero ranks, warnings through logging."""

import logging
import warnings

import pytest

from perf_logger import RankPrefix, configure_process_logs


@pytest.fixture
def root_logging():
    """The root logger with one capturing handler, warning capture off; level, filters and capture restored after."""
    root = logging.getLogger()
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(handler.format(record))
    saved_level, saved_handlers = root.level, list(root.handlers)
    root.handlers, root.level = [handler], logging.INFO
    logging.captureWarnings(False)  # an earlier test of this process may have left it on, which makes turning it on
    yield records  # a no-op that keeps whatever `warnings.showwarning` that test had (under xdist: any test before)
    for any_handler in root.handlers:  # pytest's own capture handlers are on the root logger during a test too
        for rank_filter in [f for f in any_handler.filters if isinstance(f, RankPrefix)]:
            any_handler.removeFilter(rank_filter)
    root.handlers, root.level = saved_handlers, saved_level
    logging.captureWarnings(False)


def test_a_non_zero_rank_warns_with_its_rank_and_keeps_quiet_otherwise(root_logging):
    configure_process_logs(3)
    log = logging.getLogger("recipe")
    log.info("Rank 3/4 on cpu")
    log.warning("disk almost full")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("a library complains", UserWarning, stacklevel=1)
    assert root_logging[0] == "[rank 3] disk almost full"
    assert len(root_logging) == 2 and root_logging[1].startswith("[rank 3] ")
    assert "a library complains" in root_logging[1]  # Python warnings come through logging, prefixed too
    configure_process_logs(3)  # a second call (a second run in one process) adds no second prefix
    log.warning("again")
    assert root_logging[-1] == "[rank 3] again"


def test_rank_zero_logs_as_before(root_logging):
    configure_process_logs(0)
    logging.getLogger("recipe").info("Model: esm2_t6_8M_UR50D")
    assert root_logging == ["Model: esm2_t6_8M_UR50D"]
    assert not any(isinstance(f, RankPrefix) for h in logging.getLogger().handlers for f in h.filters)
    assert logging.getLogger().level == logging.INFO


def test_transformer_engine_import_notes_are_dropped_but_its_warnings_kept(root_logging):
    """The two lines TE writes into every GPU log at import (seen on the lent H200), and a real TE warning."""
    te_log = logging.getLogger("TransformerEngine")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        configure_process_logs(0)  # its filters go on top of the "always" of this block
        warnings.warn(
            "Detected a Jax installation but could not find the shared object file", RuntimeWarning, stacklevel=1
        )
        te_log.info("torch.compile custom-op path disabled: could not register OpaqueValueBundle")
        te_log.warning("FP8 amax history is shorter than the recipe asks")
        warnings.warn("a user-visible RuntimeWarning", RuntimeWarning, stacklevel=1)
    assert root_logging[0] == "FP8 amax history is shorter than the recipe asks"
    assert len(root_logging) == 2 and "a user-visible RuntimeWarning" in root_logging[1]
    te_log.setLevel(logging.NOTSET)
