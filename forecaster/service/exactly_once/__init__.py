"""Exactly once: the transactional committer, the state changelog, the series ledger and recovery."""

from forecaster.service.exactly_once.parts import ExactlyOnce

__all__ = ["ExactlyOnce"]
