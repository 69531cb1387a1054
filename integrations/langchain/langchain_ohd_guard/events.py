"""Verdicts as LangChain custom events.

Every verdict an integration produces is sent to the LangChain callback system as a custom event
named :data:`ohd_guard.guard.EVENT_NAME` (``"ohd_guard.verdict"``) whose data is the verdict's JSON
payload (``Verdict.model_dump(mode="json")``; rebuild it with ``Verdict.model_validate(data)``).
It shows up in ``astream_events`` (``event == "on_custom_event"``) and in ``on_custom_event`` of any
callback handler, attached to the run that screened the input. (LangSmith's tracer does not record
custom events; there the verdict is seen in the runs' outputs and ``response_metadata``.)
"""

from __future__ import annotations

from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForChainRun, adispatch_custom_event, dispatch_custom_event
from langchain_core.callbacks.manager import BaseRunManager, ahandle_event, handle_event
from langchain_core.runnables import RunnableConfig

EVENT_NAME = "ohd_guard.verdict"  # == ohd_guard.guard.EVENT_NAME (checked in the tests; no torch import here)

__all__ = ["EVENT_NAME", "adispatch_verdict", "dispatch_verdict", "verdict_payload"]


def verdict_payload(verdict: Any) -> dict[str, Any]:
    """The JSON-able event data of a verdict."""
    return verdict.model_dump(mode="json")


def _on_run(run_manager: BaseRunManager, verdict: Any) -> None:
    handle_event(run_manager.handlers, "on_custom_event", "ignore_custom_event", EVENT_NAME, verdict_payload(verdict),
                 run_id=run_manager.run_id, tags=run_manager.tags, metadata=run_manager.metadata)


async def _aon_run(run_manager: BaseRunManager, verdict: Any) -> None:
    await ahandle_event(run_manager.handlers, "on_custom_event", "ignore_custom_event", EVENT_NAME,
                        verdict_payload(verdict), run_id=run_manager.run_id, tags=run_manager.tags,
                        metadata=run_manager.metadata)


def dispatch_verdict(verdict: Any, config: RunnableConfig | None = None, *,
                     run_manager: BaseRunManager | None = None) -> bool:
    """Send ``verdict`` as a custom event on ``run_manager``'s run, else on the current run (from
    ``config`` or the context). Returns False, and sends nothing, outside of any run."""
    if run_manager is not None:
        _on_run(run_manager, verdict)
        return True
    try:
        dispatch_custom_event(EVENT_NAME, verdict_payload(verdict), config=config)
    except RuntimeError:  # "Unable to dispatch an adhoc event without a parent run id"
        return False
    return True


async def adispatch_verdict(verdict: Any, config: RunnableConfig | None = None, *,
                            run_manager: BaseRunManager | AsyncCallbackManagerForChainRun | None = None) -> bool:
    """Async twin of :func:`dispatch_verdict` (runs async callback handlers on the event loop)."""
    if run_manager is not None:
        await _aon_run(run_manager, verdict)
        return True
    try:
        await adispatch_custom_event(EVENT_NAME, verdict_payload(verdict), config=config)
    except RuntimeError:
        return False
    return True
