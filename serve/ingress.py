"""Ingress deployment: the HTTP API (FastAPI, OpenAPI at /docs), composing retrieval -> rerank -> business filter.

Errors never reach a client as a stack trace: unknown ids answer 404, bad parameters or bodies 422, an
unreachable vector store or an overloaded / restarting stage 503 with ``Retry-After``, anything else 500 with a
one-line message (the trace goes to the replica's log).
"""
# No `from __future__ import annotations` here: Serve rebuilds the routes and cannot resolve string annotations.

import asyncio
import json
import logging
import time
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.handle import DeploymentHandle

from common.business_rules import BusinessRules
from common.errors import ConfigError, NotFoundError, StoreUnavailableError, VitrineError
from common.user_history import segment_of
from serve.config import MAX_EVENTS, MAX_K, ServeConfig
from serve.events import merge_answers, partial_answer, split_by_user
from serve.messages import Ranking, load_in_replica

log = logging.getLogger(__name__)

RETRY_AFTER_S = 5
RULES_TTL_S = 1.0  # how stale the ingress's copy of the business rules (for pushdown) may be


class Event(BaseModel):
    """One interaction, as in the events schema (common/events.py)."""

    model_config = ConfigDict(extra="forbid")
    user_id: str = Field(min_length=1, max_length=128)
    item_id: str = Field(min_length=1, max_length=128)
    event: str = Field(min_length=1, max_length=32, description="view, wishlist, add_to_bag, purchase, rating, "
                                                                "dislike or return")
    ts: str | None = Field(None, description="ISO-8601 time; default: when the server received it")
    session_id: str | None = None
    order_id: str | None = None
    button: str | None = None
    value: float | None = None
    event_id: str | None = Field(None, max_length=128, description="the client's id for this event (a UUID, or "
                                 "any string unique per user): an event sent again under its id is answered as a "
                                 "duplicate instead of being counted twice, so a batch may be retried safely")


class EventBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    events: list[Event] = Field(min_length=1, max_length=MAX_EVENTS)


api = FastAPI(title="Vitrine", description="Multimodal product recommendations: retrieval -> rerank -> "
                                           "business filter, on Ray Serve and Milvus.", version="0.4")


def _cause(e: BaseException) -> BaseException:
    """The exception a replica raised (Ray wraps it in RayTaskError on the way back)."""
    from ray.exceptions import RayTaskError

    while isinstance(e, RayTaskError) and getattr(e, "cause", None) is not None and e.cause is not e:
        e = e.cause
    return e


def error_response(e: BaseException) -> JSONResponse:
    """Map an exception to its status and a one-line message."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    from ray.serve.exceptions import BackPressureError

    e = _cause(e)
    message = str(e).strip().splitlines()[0][:500] if str(e).strip() else type(e).__name__
    if isinstance(e, NotFoundError):
        return JSONResponse({"error": message}, status_code=404)
    if isinstance(e, StoreUnavailableError):
        return JSONResponse({"error": f"the vector store is unavailable: {message}"}, status_code=503,
                            headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(e, (BackPressureError, RayActorError, ActorDiedError, ActorUnavailableError)):
        return JSONResponse({"error": "a serving stage is overloaded or restarting; retry shortly"},
                            status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(e, (ValueError, ConfigError)) and isinstance(e, VitrineError):  # bad input: filters, values
        return JSONResponse({"error": message}, status_code=422)
    if isinstance(e, VitrineError):  # a server-side failure we understand (the store refused a write, ...)
        log.error("request failed: %s", message)
        return JSONResponse({"error": message}, status_code=500)
    log.exception("unexpected error", exc_info=e)
    return JSONResponse({"error": f"internal error ({type(e).__name__})"}, status_code=500)


@api.exception_handler(Exception)
async def _any_error(request: Request, e: Exception) -> JSONResponse:
    return error_response(e)


def _overrides(category: list[str] | None, price_min: float | None, price_max: float | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if category:
        out["allow_categories"] = tuple(category)
    if price_min is not None:
        out["price_min"] = price_min
    if price_max is not None:
        out["price_max"] = price_max
    return out


def _body(ranking: Ranking, t0: float, **extra: Any) -> JSONResponse:
    """The answer as JSON, rendered directly (FastAPI's generic encoder walking the body cost 10x json.dumps)."""
    items = [{"item_id": r.item_id, "score": round(float(r.score), 5), **r.fields, "reasons": r.reasons}
             for r in ranking.items]
    return JSONResponse({"strategy": ranking.strategy, **extra,
                         "took_ms": round((time.perf_counter() - t0) * 1e3, 2), "items": items})


K = Query(10, ge=1, le=MAX_K, description=f"number of results (1-{MAX_K})")
CATEGORY = Query(None, description="only these categories (repeatable)")
PRICE_MIN = Query(None, ge=0)
PRICE_MAX = Query(None, ge=0)


@serve.deployment
@serve.ingress(api)
class Ingress:
    """Each request is a chain of handle calls, retrieval -> rerank -> filter, passing each stage's response to
    the next without waiting here (Serve resolves it in the next replica), so candidates never travel through
    the ingress. The business rules are read from the filter at most once a second, to push their hard
    filters into retrieval; the filter applies its own current rules last."""

    def __init__(self, cfg: ServeConfig, retriever: DeploymentHandle, reranker: DeploymentHandle,
                 business_filter: DeploymentHandle, sinks: list[DeploymentHandle]) -> None:
        load_in_replica(self)
        self.cfg = cfg
        self.retriever, self.reranker, self.filter, self.sinks = retriever, reranker, business_filter, list(sinks)
        self._rules: BusinessRules | None = None
        self._rules_at = 0.0

    def _pool(self, k: int) -> int:
        return max(self.cfg.candidates, 3 * k)

    async def _effective(self, overrides: dict[str, Any]) -> BusinessRules:
        if self._rules is None or time.monotonic() - self._rules_at > RULES_TTL_S:
            self._rules, self._rules_at = await self.filter.current.remote(), time.monotonic()
        return self._rules.merged(overrides) if overrides else self._rules

    async def _ranked(self, found, k: int, overrides: dict[str, Any], pinned: bool = False) -> Ranking:
        return await self.filter.apply.remote(self.reranker.rank.remote(found, k), k, overrides, pinned)

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self) -> JSONResponse:
        try:
            stages = {"retriever": await self.retriever.ready.remote(), "reranker": await self.reranker.ready.remote(),
                      "business_filter": {"replica": await self.filter.replica.remote()}}
        except Exception as e:  # noqa: BLE001 - readiness reports any failure as not ready
            response = error_response(e)
            return JSONResponse({"status": "not ready", "error": response.body.decode()},
                                status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})
        return JSONResponse({"status": "ready", **stages})

    @api.get("/items/{item_id}/similar")
    async def similar(self, item_id: str, k: int = K, category: list[str] | None = CATEGORY,
                      price_min: float | None = PRICE_MIN, price_max: float | None = PRICE_MAX) -> dict[str, Any]:
        t0 = time.perf_counter()
        overrides = _overrides(category, price_min, price_max)
        rules = await self._effective(overrides)
        found = self.retriever.similar.remote(item_id, self._pool(k), rules.milvus_filter())
        return _body(await self._ranked(found, k, overrides), t0, item_id=item_id)

    @api.get("/items/{item_id}/bought-together")
    async def bought_together(self, item_id: str, k: int = K) -> dict[str, Any]:
        t0 = time.perf_counter()
        found = self.retriever.bought_together.remote(item_id, self._pool(k))
        return _body(await self._ranked(found, k, {}), t0, item_id=item_id)

    @api.get("/users/{user_id}/recommendations")
    async def recommendations(self, user_id: str, k: int = K, category: list[str] | None = CATEGORY,
                              price_min: float | None = PRICE_MIN, price_max: float | None = PRICE_MAX,
                              age: int | None = Query(None, ge=0, le=130, description="user feature (segment)"),
                              region: str | None = Query(None, max_length=64, description="user feature (segment)"),
                              ) -> dict[str, Any]:
        t0 = time.perf_counter()
        overrides = _overrides(category, price_min, price_max)
        rules = await self._effective(overrides)
        found = self.retriever.for_user.remote(user_id, self._pool(k), rules.milvus_filter(), segment_of(age, region),
                                               rules.exclude_seen, rules.pinned)
        ranking = await self._ranked(found, k, overrides, pinned=True)
        return _body(ranking, t0, user_id=user_id, segment=ranking.segment)

    @api.get("/search")
    async def search(self, q: str = Query(..., min_length=1, max_length=512, description="free-text query"),
                     k: int = K, category: list[str] | None = CATEGORY, price_min: float | None = PRICE_MIN,
                     price_max: float | None = PRICE_MAX) -> dict[str, Any]:
        t0 = time.perf_counter()
        overrides = _overrides(category, price_min, price_max)
        rules = await self._effective(overrides)
        found = self.retriever.search.remote(q, self._pool(k), rules.milvus_filter())
        return _body(await self._ranked(found, k, overrides), t0, query=q)

    @api.post("/events")
    async def post_events(self, batch: EventBatch) -> Any:
        """Append a batch durably (acknowledged = written), then update the users' session vectors. With several
        event sinks a batch of several users is appended by each owning sink; when some fail, the reply has the
        failure's status (503 for a restarting sink) and says what the others appended and which batch positions
        to send again (``not_appended``): resending the whole batch would log the appended ones twice, unless
        its events carry ``event_id`` (then the appended ones come back as ``duplicates``)."""
        t0 = time.perf_counter()
        rows = [e.model_dump() for e in batch.events]
        if len(self.sinks) == 1:
            result = await self.sinks[0].append.remote(rows)
        else:  # each user's events to the sink that owns the user; the sinks append at the same time
            positions = split_by_user(rows, len(self.sinks))
            shards = [s for s, where in enumerate(positions) if where]
            parts = [positions[s] for s in shards]
            answers = await asyncio.gather(*(self.sinks[s].append.remote([rows[i] for i in where])
                                             for s, where in zip(shards, parts)), return_exceptions=True)
            failures = [a for a in answers if isinstance(a, BaseException)]
            if failures:
                if len(failures) == len(answers):
                    raise failures[0]
                failed = error_response(failures[0])
                log.warning("POST /events: %d of %d sinks failed; the others' events are appended", len(failures),
                            len(answers))
                partial = partial_answer(answers, parts)
                return JSONResponse({**json.loads(failed.body), **partial}, status_code=failed.status_code,
                                    headers={k: v for k, v in failed.headers.items() if k.lower() == "retry-after"})
            result = merge_answers(answers, parts)
        body = {**result, "took_ms": round((time.perf_counter() - t0) * 1e3, 2)}
        if not result["accepted"] and not result["duplicates"]:
            return JSONResponse({"error": "no valid event in the batch", **body}, status_code=422)
        return body
