"""The gateway's check of a request's query parameters against those its route declares.

A parameter a route does not take was ignored by FastAPI: ``/events?limt=5`` gave a default
page that looked like an answer, ``/stats?x=1`` the stats as if nothing were wrong. So every
route, FastAPI's own pages (``/openapi.json``, ``/docs``, ``/redoc``) and ``POST /publish``
included, answers **400** to a parameter it does not take, naming it and the ones the route
takes ("none" for most); to one given twice but for a list (which would count?); and to a
whole number written other than in ASCII digits (pydantic reads ``1.0`` and ``+1`` as 1, where
the daemon and ``Last-Event-ID`` refuse them).

What a route takes is read from its own declaration (:class:`QueryRules.of`): the query
parameters of its FastAPI signature, a ``list`` one repeatable, an ``int`` one a whole number.
So a new route is checked the same way without a word more, and the check cannot drift from
the OpenAPI document. :class:`QueryCheck` applies them in one place, as ASGI middleware, before
the route runs; a request no route takes (404, 405) is left to the router.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.datastructures import QueryParams
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, Route
from starlette.types import ASGIApp, Receive, Scope, Send

QUOTED_VALUE = 40  # how much of a refused value is quoted back


@dataclass(frozen=True, slots=True)
class QueryRules:
    """The query parameters one route takes, in the order it declares them."""

    known: tuple[str, ...] = ()
    repeatable: frozenset[str] = frozenset()
    whole_numbers: frozenset[str] = frozenset()

    @classmethod
    def of(cls, route: BaseRoute) -> QueryRules:
        """What ``route`` declares; none for a plain Starlette route (FastAPI's own pages: ``/openapi.json``,
        ``/docs``, ``/redoc``), which has no signature of parameters."""
        if not isinstance(route, APIRoute):
            return cls()
        known: list[str] = []
        repeatable: set[str] = set()
        whole_numbers: set[str] = set()
        for param in _query_params(route.dependant):
            known.append(param.alias)
            kinds = set(_kinds(param.field_info.annotation))
            if kinds & {list, tuple, set, frozenset}:
                repeatable.add(param.alias)
            if int in kinds:  # a bool is not: its type is bool, which pydantic reads from "true"
                whole_numbers.add(param.alias)
        return cls(tuple(dict.fromkeys(known)), frozenset(repeatable), frozenset(whole_numbers))

    def problem(self, items: Sequence[tuple[str, str]], route: str) -> str | None:
        """Why the query ``items`` (name and value, in order) are refused on ``route`` (``GET
        /events``), or None when they are fine."""
        for name, value in items:
            if name in self.whole_numbers and not in_digits(value):
                return f"query parameter {name!r} must be a whole number in digits, not {value[:QUOTED_VALUE]!r}"
        unknown = sorted({name for name, _ in items if name not in self.known})
        if unknown:
            takes = ", ".join(self.known) or "none"
            return f"unknown query parameter {', '.join(map(repr, unknown))}: {route} takes {takes}"
        names = [name for name, _ in items if name not in self.repeatable]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            return f"query parameter {', '.join(map(repr, repeated))} given more than once: give it once"
        return None


class QueryCheck:
    """ASGI middleware: answer ``refuse(error)`` (a 400) to a request whose query parameters the
    route it goes to does not take (see :meth:`QueryRules.problem`).

    Placed inside :class:`transport.gateway.HeadAsGet`, so a ``HEAD`` answered as ``GET`` is
    checked as the ``GET``. The routes are read when the application's middleware is built (its
    first request), once they are all declared.
    """

    def __init__(self, app: ASGIApp, routes: Iterable[BaseRoute], refuse: Callable[[str], Response]) -> None:
        self.app = app
        self.routes = [(route, QueryRules.of(route)) for route in routes if isinstance(route, Route)]
        self.refuse = refuse

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # Not async: it hands back the next application's coroutine (or the refusal's) for the
        # server to await, rather than awaiting it in a frame of its own. The request is then
        # handled on a stack one frame shallower, and POST /publish's JSON decoder reads as deep
        # as before (it stops where Python's recursion limit does: docs/gateway.md's 970 levels).
        if scope["type"] == "http" and scope.get("query_string"):  # no query: nothing to check
            for route, rules in self.routes:
                match, _ = route.matches(scope)
                if match is Match.FULL:
                    items = QueryParams(scope["query_string"]).multi_items()
                    problem = rules.problem(items, f"{scope['method']} {route.path}")
                    if problem is not None:
                        return self.refuse(problem)(scope, receive, send)
                    break
        return self.app(scope, receive, send)


def in_digits(text: str) -> bool:
    """Whether ``text`` is a whole number written in ASCII digits only (``str.isdigit`` alone
    takes other scripts' digits and superscripts, which ``int`` then reads or refuses)."""
    return text.isascii() and text.isdigit()


def _query_params(dependant: Dependant) -> Iterator[Any]:
    """The query parameters of a route's signature and of its dependencies'."""
    yield from dependant.query_params
    for sub in dependant.dependencies:
        yield from _query_params(sub)


def _kinds(annotation: Any) -> Iterator[Any]:
    """The types an annotation allows, a union's members each, a generic's origin (``list[str]``: list)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        for member in typing.get_args(annotation):
            yield from _kinds(member)
    elif origin is typing.Annotated:
        yield from _kinds(typing.get_args(annotation)[0])
    else:
        yield origin or annotation
