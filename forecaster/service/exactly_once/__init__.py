"""Exactly once: the transactional committer, the state changelog, the series ledger and recovery."""

from forecaster.service.exactly_once.committer import ExactlyOnceCommitter
from forecaster.service.exactly_once.ledger import SeriesLedger
from forecaster.service.exactly_once.recovery import PartitionOwner

__all__ = ["ExactlyOnceCommitter", "PartitionOwner", "SeriesLedger"]
