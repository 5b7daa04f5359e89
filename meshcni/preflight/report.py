"""Run every probe (or pretend a feature is missing) and collect the results into one report.

Masking is how tests and operators simulate a kernel without a feature: a masked feature is reported
failed, "masked by configuration", and its probe is never run. Masks come from the caller and from
$MESHCNI_MASK_FEATURES (comma-separated) together; an unknown id is an error rather than silently ignored,
since a typo there would leave the feature the operator meant to turn off in use. A feature whose `needs`
failed is reported failed without probing, naming what it needed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Mapping

from meshcni.preflight import probes as probe_fns
from meshcni.preflight.features import FEATURE_IDS, FEATURES

MASK_ENV = "MESHCNI_MASK_FEATURES"
MASKED_DETAIL = "masked by configuration"


class PreflightError(ValueError):
    """The preflight was asked for something it cannot do (an unknown feature id to mask)."""


@dataclass(frozen=True)
class FeatureResult:
    feature: str
    ok: bool
    detail: str
    remedy: str
    masked: bool = False

    def to_dict(self) -> dict:
        return {"feature": self.feature, "ok": self.ok, "masked": self.masked, "detail": self.detail,
                "remedy": None if self.ok else self.remedy}


@dataclass(frozen=True)
class Report:
    """The outcome of every probe, in the order of FEATURE_IDS."""

    kernel: str
    results: tuple[FeatureResult, ...]

    def result(self, feature: str) -> FeatureResult:
        for r in self.results:
            if r.feature == feature:
                return r
        raise KeyError(feature)

    def ok(self, feature: str) -> bool:
        return self.result(feature).ok

    @property
    def failed(self) -> list[FeatureResult]:
        return [r for r in self.results if not r.ok]

    @property
    def masked(self) -> list[str]:
        return [r.feature for r in self.results if r.masked]

    def to_dict(self) -> dict:
        return {"kernel": self.kernel, "features": [r.to_dict() for r in self.results]}


def masked_features(masked: Iterable[str] = (), env: Mapping[str, str] | None = None) -> frozenset[str]:
    """The union of `masked` and $MESHCNI_MASK_FEATURES; raises PreflightError naming unknown ids."""
    env = os.environ if env is None else env
    names = {m.strip() for item in masked for m in str(item).split(",") if m.strip()}
    names |= {m.strip() for m in env.get(MASK_ENV, "").split(",") if m.strip()}
    unknown = sorted(names - set(FEATURE_IDS))
    if unknown:
        raise PreflightError(f"unknown feature(s) to mask: {', '.join(unknown)} "
                             f"(known: {', '.join(FEATURE_IDS)})")
    return frozenset(names)


def probe(masked: Iterable[str] = (), env: Mapping[str, str] | None = None) -> Report:
    """Probe the running kernel and node for every feature, treating `masked` ones as missing."""
    masks = masked_features(masked, env)
    results: dict[str, FeatureResult] = {}
    for fid in FEATURE_IDS:
        feature = FEATURES[fid]
        if fid in masks:
            results[fid] = FeatureResult(fid, False, MASKED_DETAIL, feature.remedy, masked=True)
            continue
        missing = [n for n in feature.needs if not results[n].ok]
        if missing:
            first = results[missing[0]]
            results[fid] = FeatureResult(fid, False, f"not probed: needs {', '.join(missing)}", first.remedy)
            continue
        results[fid] = _run(fid, results)
    return Report(kernel=os.uname().release, results=tuple(results[f] for f in FEATURE_IDS))


def _run(fid: str, so_far: Mapping[str, FeatureResult]) -> FeatureResult:
    feature = FEATURES[fid]
    fn = probe_fns.PROBES[fid]
    try:
        # kernel_headers compiles with bcc only when bcc itself passed (and was not masked)
        detail = fn(so_far["bcc"].ok) if fid == "kernel_headers" else fn()
    except probe_fns.ProbeFailed as exc:
        return FeatureResult(fid, False, str(exc), feature.remedy)
    except Exception as exc:  # noqa: BLE001 - a probe's whole job is to turn any failure into a result
        return FeatureResult(fid, False, str(exc) or type(exc).__name__, feature.remedy)
    return FeatureResult(fid, True, detail, feature.remedy)
