"""``validate_checkpoint`` for the export package: the implementation lives in ``jaxquant.check``
(report, reader, rules); this module re-exports it so ``jaxquant.export.validate_checkpoint`` works."""

from jaxquant.check import RULES, Finding, Report, validate_checkpoint

__all__ = ["RULES", "Finding", "Report", "validate_checkpoint"]
