"""What transport/gateway_query.py reads from a route's declaration, and what it refuses, without a server.

The gateway's own routes are checked over real HTTP in tests/test_gateway.py
(test_every_route_refuses_a_query_parameter_it_does_not_take)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, FastAPI, Query
from starlette.routing import Route

from transport.gateway_query import QueryRules


def paging(page: Annotated[int, Query(ge=1)] = 1) -> int:
    return page


def rules_of_routes() -> dict[str, QueryRules]:
    app = FastAPI()

    @app.get("/things")
    async def things(
        name: str | None = None,
        tags: Annotated[list[str] | None, Query()] = None,
        flag: bool = False,
        count: int | None = None,
        page: int = Depends(paging),
    ) -> None:
        pass

    @app.get("/plain")
    async def plain() -> None:
        pass

    return {route.path: QueryRules.of(route) for route in app.router.routes if isinstance(route, Route)}


def test_the_rules_come_from_the_routes_declaration() -> None:
    rules = rules_of_routes()
    # In declaration order, a dependency's parameters too; a list repeats; only int is a whole number.
    assert rules["/things"] == QueryRules(
        known=("name", "tags", "flag", "count", "page"),
        repeatable=frozenset({"tags"}),
        whole_numbers=frozenset({"count", "page"}),
    )
    assert rules["/plain"] == QueryRules()
    assert rules["/openapi.json"] == QueryRules()  # FastAPI's own page: no parameter


def test_a_problem_names_the_parameter_and_what_the_route_takes() -> None:
    things = rules_of_routes()["/things"]
    route = "GET /things"
    assert things.problem([("name", "a"), ("tags", "x"), ("tags", "y"), ("count", "3")], route) is None
    assert things.problem([("nmae", "a")], route) == (
        "unknown query parameter 'nmae': GET /things takes name, tags, flag, count, page"
    )
    assert things.problem([("name", "a"), ("name", "b")], route) == (
        "query parameter 'name' given more than once: give it once"
    )
    assert things.problem([("count", "1"), ("count", "+1")], route) == (
        "query parameter 'count' must be a whole number in digits, not '+1'"
    )
    assert things.problem([("count", "١٢")], route) == (  # Arabic-Indic digits: int reads them, the daemon not
        "query parameter 'count' must be a whole number in digits, not '١٢'"
    )
    assert things.problem([("flag", "true")], route) is None
    assert QueryRules().problem([("x", ""), ("x", "1")], "GET /plain") == (
        "unknown query parameter 'x': GET /plain takes none"
    )
    assert QueryRules().problem([], "GET /plain") is None
