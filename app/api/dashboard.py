"""The read-only dashboard: server-rendered HTML (Jinja2), plots as PNG, code
highlighted with Pygments on the server. No JavaScript, no front-end build."""

from pathlib import Path as FilePath
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, HTTPException, Path, Request
from fastapi.responses import HTMLResponse, Response
from fastapi.templating import Jinja2Templates
from markupsafe import Markup
from pydantic import ValidationError
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import get_lexer_by_name

from app import queries
from app.api.deps import DbSession
from app.report import PLOTS, plot_png
from models.enums import Language, Origin, Verdict

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=FilePath(__file__).parent / "templates")

PAGE_SIZE = 50
CODE_STYLE = HtmlFormatter(style="friendly").get_style_defs(".highlight")


@router.get("/", response_class=HTMLResponse)
def index(request: Request, session: DbSession) -> HTMLResponse:
    return templates.TemplateResponse(
        request,
        "index.html",
        {
            "iterations": queries.iteration_summaries(session),
            "plots": PLOTS,
            "metric_keys": queries.ITERATION_METRIC_KEYS,
        },
    )


@router.get("/plots/{name}.png")
def plot(session: DbSession, name: str) -> Response:
    if name not in PLOTS:
        raise HTTPException(404, f"no plot {name!r}; known: {', '.join(PLOTS)}")
    return Response(
        plot_png(session, name), media_type="image/png", headers={"cache-control": "no-store"}
    )


def _parse_filter(params: dict[str, str]) -> tuple[queries.CandidateFilter, list[str]]:
    """The browser's form sends every field, empty ones as ''; those mean "any". The
    filter's own bounds judge the rest; a bad value is reported and left out."""
    values = {
        name: raw.strip()
        for name, raw in params.items()
        if name in queries.CandidateFilter.model_fields and raw.strip()
    }
    try:
        return queries.CandidateFilter(**values), []
    except ValidationError as error:
        bad = {str(problem["loc"][0]) for problem in error.errors()}
    errors = [f"{name}: {raw!r} is not valid" for name, raw in values.items() if name in bad]
    kept = {name: raw for name, raw in values.items() if name not in bad}
    return queries.CandidateFilter(**kept), errors


@router.get("/browse", response_class=HTMLResponse)
def browse(request: Request, session: DbSession) -> HTMLResponse:
    params = dict(request.query_params)
    flt, errors = _parse_filter(params)
    page = None
    if not errors:
        try:
            page = queries.list_candidates(
                session, flt, limit=PAGE_SIZE, cursor=params.get("cursor") or None
            )
        except queries.QueryError as error:
            errors.append(str(error))
    next_url = None
    if page is not None and page.next_cursor:
        next_url = "/browse?" + urlencode(
            {**{k: v for k, v in params.items() if k != "cursor"}, "cursor": page.next_cursor}
        )
    return templates.TemplateResponse(
        request,
        "browse.html",
        {
            "params": params,
            "errors": errors,
            "page": page,
            "next_url": next_url,
            "languages": list(Language),
            "verdicts": list(Verdict),
            "origins": list(Origin),
            "sorts": queries.SORTS,
        },
        status_code=400 if errors else 200,
    )


@router.get("/browse/{candidate_id}", response_class=HTMLResponse)
def candidate_page(
    request: Request, session: DbSession, candidate_id: Annotated[int, Path(ge=1, le=2**63 - 1)]
) -> HTMLResponse:
    detail = queries.candidate_detail(session, candidate_id)
    if detail is None:
        raise HTTPException(404, f"no candidate {candidate_id}")
    # Our language names are Pygments lexer names too. PHP candidates open with
    # <?php only sometimes, so that lexer must not wait for one (startinline).
    lexer = get_lexer_by_name(detail["problem"]["language"], startinline=True)
    code = Markup(highlight(detail["code"], lexer, HtmlFormatter(linenos="table")))
    return templates.TemplateResponse(
        request, "candidate.html", {"c": detail, "code": code, "code_style": Markup(CODE_STYLE)}
    )
