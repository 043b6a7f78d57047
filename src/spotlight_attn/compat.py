"""The one place that knows which transformers is installed and where its contracts differ by version.

spotlight-attn runs on the transformers releases in SUPPORTED_TRANSFORMERS (pyproject.toml states the
same range; a test keeps the two equal). CI runs the whole suite on the newest release the range
allows and a compatibility subset (tests/test_compat.py) on the oldest. `enable()` refuses a
transformers outside the range with one error naming both, unless ALLOW_UNTESTED_ENV is set.

What differs across the supported releases, and how the library reads it:
- The forward argument that carries the cache is `cache` from 5.24 on (`past_key_values` stays as
  a deprecated alias that loses when both arrive) and `past_key_values` before. The name is read
  from each model's own forward signature, never assumed (`cache_argument`).
- Model outputs and generate() outputs hold the cache under the same two names (`output_cache`).
- `DynamicLayer.crop(n)` with n > 0 meant "keep n tokens" before 5.24 and raises from 5.24 on; a
  negative n (remove that many) means the same everywhere. SpotlightLayer.crop defers to the
  installed DynamicLayer, so it follows the installed contract.
- generate() reads its stop flag from the device after every step, so the device idles while the host
  prepares the next one (about 1.9 ms a step on the H200, docs/BENCHMARKS.md). 5.17, 5.24 and 5.25
  (the releases the suite has passed on) ship `DeferredStopCheck`, which reads the flag one step late and undoes the one
  extra step it costs, but turns it on only for `mps`. `defer_stop_checks` lets it serve generate() over our static
  cache on CUDA too (`SpotlightConfig.defer_stop`); any other cache keeps the installed rule.
"""

from __future__ import annotations

import inspect
import logging
import os

from spotlight_attn.errors import UnsupportedModelError, UnsupportedVersionError

MIN_TRANSFORMERS = "5.17.0"  # the oldest release CI tests (the compatibility subset)
BELOW_TRANSFORMERS = "5.26"  # the first release not yet tested
SUPPORTED_TRANSFORMERS = f">={MIN_TRANSFORMERS},<{BELOW_TRANSFORMERS}"
ALLOW_UNTESTED_ENV = "SPOTLIGHT_ALLOW_UNTESTED_TRANSFORMERS"
CACHE_NAMES = ("cache", "past_key_values")  # the forward's cache argument: the newest name first
DEFER_DEVICES = ("cuda",)  # devices where our static cache defers generate()'s stop check
_STOP_CHECK_PARAMETERS = ("device", "cache", "cache_is_returned", "is_assistant")

logger = logging.getLogger(__name__)


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def check_transformers(version: str | None = None) -> None:
    """Refuse a transformers release outside SUPPORTED_TRANSFORMERS (unless ALLOW_UNTESTED_ENV=1)."""
    from packaging.version import Version

    version = version or transformers_version()
    parsed = Version(version)
    # A pre-release of the next minor (5.26.0.dev0) is outside the range, as is any 5.26 release.
    inside = Version(MIN_TRANSFORMERS) <= parsed and parsed.release < Version(BELOW_TRANSFORMERS).release
    if inside or os.environ.get(ALLOW_UNTESTED_ENV, "") not in ("", "0"):
        return
    raise UnsupportedVersionError(
        f"transformers {version} is installed, but spotlight-attn is tested with transformers {SUPPORTED_TRANSFORMERS}: "
        f"pip install 'transformers{SUPPORTED_TRANSFORMERS}' (or set {ALLOW_UNTESTED_ENV}=1 to try this release anyway)"
    )


def cache_argument(module) -> str:
    """The name under which `module.forward` (a decoder or a *ForCausalLM) takes its cache."""
    parameters = inspect.signature(module.forward).parameters
    for name in CACHE_NAMES:
        if name in parameters:
            return name
    raise UnsupportedModelError(
        f"{type(module).__name__}.forward takes no cache argument (none of {', '.join(CACHE_NAMES)})"
    )


def pop_cache(kwargs: dict):
    """Remove the cache from forward kwargs under any of its names; -> the one the model would use."""
    found = [kwargs.pop(name) for name in CACHE_NAMES if name in kwargs]
    found = [cache for cache in found if cache is not None]
    return found[0] if found else None  # the newest name wins, as transformers' own alias handling does


def output_cache(output):
    """The cache a model output or a generate() output holds (None if it holds none)."""
    for name in CACHE_NAMES:
        cache = getattr(output, name, None)
        if cache is not None:
            return cache
    return None


def defer_stop_checks() -> bool:
    """Let generate() check its stop condition one step late over a cache that asks for it.

    transformers' `DeferredStopCheck.is_supported(device, cache, cache_is_returned, is_assistant)`
    decides per generate() call; this wraps it, once per process, so that it also answers yes for a
    cache whose `defers_stop` is true on a DEFER_DEVICES device (not for an assistant model), and
    otherwise gives the installed answer. The deferred check crops the extra step from a returned cache
    (SpotlightStaticCache.crop). -> whether generate() can defer (False on a release without the class
    or with another signature: generate() then checks every step, as before).
    """
    try:
        from transformers.generation.utils import DeferredStopCheck
    except ImportError:
        logger.info("transformers %s has no DeferredStopCheck: generate() checks its stop flag every step",
                    transformers_version())
        return False
    installed = inspect.getattr_static(DeferredStopCheck, "is_supported", None)
    rule = getattr(installed, "__func__", None)
    if getattr(rule, "spotlight_wrapped", False):
        return True
    if not isinstance(installed, staticmethod) or tuple(inspect.signature(rule).parameters) != _STOP_CHECK_PARAMETERS:
        logger.info("transformers %s: DeferredStopCheck.is_supported is not the known rule; stop checks are not deferred",
                    transformers_version())
        return False

    def is_supported(device, cache, cache_is_returned, is_assistant):
        if getattr(cache, "defers_stop", False) and device.type in DEFER_DEVICES and not is_assistant:
            return True
        return rule(device, cache, cache_is_returned, is_assistant)

    is_supported.spotlight_wrapped = True
    is_supported.__doc__ = rule.__doc__
    DeferredStopCheck.is_supported = staticmethod(is_supported)
    return True
