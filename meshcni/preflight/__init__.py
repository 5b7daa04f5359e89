"""Kernel preflight: probe what the node supports, and plan capture per direction around what is missing.

`probe(masked)` runs one real check per feature (see features.py for the stable ids) and returns a
`Report`; `plan(report)` turns it into a `CapturePlan` naming the backend of each direction and every
feature given up. `meshcni doctor` prints both; the agent runs the same two calls at start.
"""

from meshcni.preflight.features import FEATURE_IDS, FEATURES, Feature
from meshcni.preflight.plan import CapturePlan, plan
from meshcni.preflight.report import (
    MASK_ENV,
    FeatureResult,
    PreflightError,
    Report,
    masked_features,
    probe,
)

__all__ = [
    "FEATURE_IDS", "FEATURES", "Feature", "CapturePlan", "plan", "MASK_ENV", "FeatureResult",
    "PreflightError", "Report", "masked_features", "probe",
]
