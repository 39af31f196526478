"""Which sites may vary and what each family offers them: ``exclude=``, ``families=``, the candidates.

Families fit their candidates on the calibration record (:mod:`attnopt.replacements`); this
step only asks each family in turn, skipping pairs that cannot work with a reason the user sees.
"""

from __future__ import annotations

import fnmatch
import logging
import warnings
from collections.abc import Callable, Sequence

from attnopt._steps import timed
from attnopt.patterns.site import AttentionSite
from attnopt.patterns.site_stats import SiteStats
from attnopt.replacements.base import FAMILY_NAMES, Candidate, get_family

__all__ = ["Exclude", "build_candidates", "resolve_exclude", "validate_families"]

log = logging.getLogger("attnopt")


#: What ``exclude=`` accepts: a glob over site names, several globs, or a predicate on the site.
Exclude = str | Sequence[str] | Callable[[AttentionSite], bool]


def resolve_exclude(exclude: Exclude | None, sites: list[AttentionSite]) -> list[str]:
    """The names of the sites ``exclude`` keeps exact; patterns that match no site are warned about.

    A string is one glob (``"model.layers.0.*"``), never iterated character by character.
    """
    if exclude is None:
        return []
    if callable(exclude):
        return [s.name for s in sites if exclude(s)]
    patterns = [exclude] if isinstance(exclude, str) else list(exclude)
    names = [s.name for s in sites]
    for pat in patterns:
        if not any(fnmatch.fnmatchcase(n, pat) for n in names):
            warnings.warn(
                f"attnopt: exclude pattern {pat!r} matches no site; the sites are {names[:6]}"
                + (" ..." if len(names) > 6 else "")
                + ".",
                stacklevel=5,
            )
    return [n for n in names if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)]


def _excluded(name: str, exclude: Sequence[str]) -> bool:
    return name in exclude or any(fnmatch.fnmatchcase(name, pat) for pat in exclude)


def validate_families(families: Sequence[str] | None) -> tuple[str, ...] | None:
    if families is None:
        return None
    if isinstance(families, str):
        families = (families,)
    bad = [f for f in families if f not in FAMILY_NAMES]
    if bad:
        raise ValueError(f"Expected families from {FAMILY_NAMES}, but got {bad}.")
    return tuple(families)


def build_candidates(
    sites: list[AttentionSite],
    stats: dict[str, SiteStats],
    families: tuple[str, ...] | None,
    exclude: Sequence[str],
    timings: dict[str, float] | None = None,
) -> dict[str, list[Candidate]]:
    """Each family's fitted candidates per site; unsupported pairs are skipped with a reason.

    ``timings`` (optional) accumulates the seconds each family spent fitting, as ``"fit <family>"``,
    so a plan's report can say which family's fitting the planning time went to.
    """
    timings = timings if timings is not None else {}
    names = families or tuple(f for f in FAMILY_NAMES if f != "exact")
    out: dict[str, list[Candidate]] = {}
    for site in sites:
        out[site.name] = []
        if not site.rewritable or _excluded(site.name, exclude):
            continue
        st = stats.get(site.name)
        if st is None or not st.q:
            log.warning("no calibration data reached site %s; it stays exact", site.name)
            continue
        for fam_name in names:
            if fam_name == "exact":
                continue
            try:
                fam = get_family(fam_name)
            except ValueError:
                log.warning("family %s is not available in this build; skipped", fam_name)
                continue
            reason = fam.unsupported_reason(site)
            if reason is not None:
                msg = f"attnopt: family {fam_name!r} cannot serve site {site.name}: {reason}; it stays exact for this family."
                if families is not None:
                    warnings.warn(msg, stacklevel=5)
                log.info(msg)
                continue
            with timed(timings, f"fit {fam_name}"):
                try:
                    out[site.name].extend(fam.candidates(site, st))
                except Exception as e:  # noqa: BLE001 - one family failing on one site must not stop planning
                    log.warning("family %s failed to fit site %s (%s: %s); no candidate", fam_name, site.name,
                                type(e).__name__, e)
    return out
