"""The Hugging Face hub before any work starts: it answers, or the cache has what is needed, or one line.

Models named by a hub id (the SD model, the local planner's model, a refiner, the
conditionings' encoders and files) download on first use. Without network the hub clients
retry each file for many seconds and end in a traceback, or in a misleading "does not appear
to have a file named config.json". So the commands that load them (:func:`prepare`) ask the
hub once, with a short timeout, before planning:

- the hub answers: nothing changes;
- it does not, and every repository needed is in the local cache: this process goes offline
  (as with ``HF_HUB_OFFLINE=1``) and loads from the cache, with no retries;
- it does not, and one is missing: :class:`HubUnreachable`, one line naming the repository,
  the setting it came from and what to do.

:func:`network_failure` recognises, in any exception's chain, a failure to reach a host, so
that the CLI prints it as one line wherever it happens (our own design).
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from grounded_sd.preflight import ConditioningConfig

PROBE_TIMEOUT_S = 5.0


class HubUnreachable(Exception):
    """The hub cannot be reached and a repository this command needs is not in the local cache."""


@dataclass(frozen=True)
class HubSource:
    """A hub repository a command will load: ``what`` it is, the ``setting`` that named it, and
    ``filename`` when one file of the repository is needed (ELLA's connector)."""

    what: str
    repo: str
    setting: str
    filename: str | None = None


def is_hub_id(source: str | Path | None) -> bool:
    """``owner/name`` that is not an existing path (the rule every loader here follows)."""
    from layout_planner.local import is_hub_id as planner_rule

    return source is not None and planner_rule(str(source))


def model_source(what: str, source: str | Path | None, setting: str) -> HubSource | None:
    """A :class:`HubSource` for a model named by ``source``, or None when it is a local path (or unset)."""
    return HubSource(what, str(source), setting) if is_hub_id(source) else None


def file_source(what: str, source: str | Path | None, setting: str) -> HubSource | None:
    """``owner/repo/path/in/repo`` (a file on the hub) as a :class:`HubSource`; None for a local file."""
    from grounded_sd.preflight import hub_file

    if source is None or not hub_file(source):
        return None
    parts = str(source).split("/")
    return HubSource(what, "/".join(parts[:2]), setting, filename="/".join(parts[2:]))


def conditioning_sources(name: str, config: "ConditioningConfig") -> list[HubSource | None]:
    """The hub files and models conditioning ``name`` loads (``config``'s, each with its setting)."""
    names = config.settings_names
    if name == "ella":
        return [file_source("ELLA's connector", config.ella_checkpoint, names["ella_checkpoint"]),
                model_source("ELLA's T5 encoder", config.ella_t5, names["ella_t5"])]
    if name == "gluenet":
        return [model_source("GlueNet's XLM-R encoder", config.gluenet_xlmr, names["gluenet_xlmr"]),
                *(file_source(f"GlueNet's {language} checkpoint", path, f"{names['gluenet_checkpoints']}[{language}]")
                  for language, path in config.gluenet_checkpoints.items())]
    return []


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def go_offline() -> None:
    """Make this process's hub clients use the local cache only (huggingface_hub checks its
    constant at every request; the environment variable is for child processes)."""
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"


def unreachable_reason(timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """None when the hub's endpoint answers an HTTP request (any status), else why not, in a few words."""
    from huggingface_hub import get_session

    try:
        get_session().head(endpoint(), timeout=timeout_s)
    except Exception as exc:  # the session's transport errors (httpx's or httpx2's); any failure means no hub
        return describe(exc)
    return None


def in_cache(source: HubSource) -> bool:
    """Whether the local hub cache holds ``source`` (its file, or a snapshot of its repository)."""
    from huggingface_hub import snapshot_download, try_to_load_from_cache
    from huggingface_hub.errors import LocalEntryNotFoundError

    if source.filename is not None:
        return isinstance(try_to_load_from_cache(source.repo, source.filename), str)
    try:
        snapshot_download(source.repo, local_files_only=True, allow_patterns=["*.json"])
    except (LocalEntryNotFoundError, OSError, ValueError):
        return False
    return True


def prepare(sources: list[HubSource | None]) -> None:
    """Before any work: check that the hub answers, or that the cache has every one of ``sources``
    (then go offline), else raise :class:`HubUnreachable`. Nothing to do offline or without hub ids."""
    needed = [s for s in sources if s is not None]
    if not needed or offline():
        return
    reason = unreachable_reason()
    if reason is None:
        return
    missing = [s for s in needed if not in_cache(s)]
    if missing:
        named = " and ".join(f"{s.what} {s.repo}/{s.filename if s.filename else ''}".rstrip("/") + f" ({s.setting})" for s in missing)
        settings = ", ".join(dict.fromkeys(s.setting for s in missing))
        raise HubUnreachable(
            f"cannot reach the Hugging Face hub at {endpoint()} ({reason}) to download {named}, not in the local "
            f"cache; connect to the network, or set {settings} to a local copy"
        )
    go_offline()


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Exception classes that mean "a host could not be reached", from the HTTP libraries loaded."""
    classes: list[type[BaseException]] = [ConnectionError, TimeoutError, socket.gaierror]
    for module, name in (("httpx", "TransportError"), ("httpx2", "TransportError"), ("requests", "ConnectionError"),
                         ("requests", "Timeout"), ("urllib3.exceptions", "HTTPError")):
        loaded = sys.modules.get(module)
        if loaded is not None and isinstance(getattr(loaded, name, None), type):
            classes.append(getattr(loaded, name))
    return tuple(classes)


def describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] if text else type(exc).__name__


def network_failure(exc: BaseException) -> str | None:
    """When ``exc`` (or an exception in its chain) is a failure to reach a host: a few words on
    which host and why; else None."""
    errors = _transport_errors()
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, errors):
            host = _host_of(current)
            return f"{host}: {describe(current)}" if host else describe(current)
        current = current.__cause__ or current.__context__
    return None


def _host_of(exc: BaseException) -> str | None:
    try:
        url = exc.request.url  # httpx's and requests' exceptions carry the request
    except (AttributeError, RuntimeError):  # httpx raises RuntimeError when no request is attached
        return None
    host = getattr(url, "host", None)
    return f"{getattr(url, 'scheme', 'http')}://{host}" + (f":{url.port}" if getattr(url, "port", None) else "") if host else None
