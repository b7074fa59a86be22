"""From teacher to student: channel groups, calibration, independence-aware pruning with
compensation, and operator substitution."""
