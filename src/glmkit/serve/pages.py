"""What a browser finds on the server: ``GET /`` (the chat page, or a page listing the endpoints), the
API's documentation at ``/docs`` (drawn from ``/openapi.json`` in the page itself, with no script from
another host), and the favicon.  ``POST /`` stays the legacy contract."""

from __future__ import annotations

import html
from importlib.resources import files

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from glmkit.serve.errors import APIError

FAVICON = files("glmkit.serve") / "static" / "favicon.svg"
#: paths a browser may load without the API key: they show nothing about the model's answers
PAGE_PATHS = ["/", "/favicon.ico", "/favicon.svg"]
# one line per endpoint on the landing page: method, path, what it is
ENDPOINTS = [
    ("POST", "/", "the ChatGLM contract (prompt, history) as the official api.py"),
    ("POST", "/v1/chat/completions", "OpenAI chat completions, streamed with \"stream\": true; tool calls"),
    ("GET", "/v1/models", "the loaded model"),
    ("GET", "/health", "liveness: 200 while requests are served"),
    ("GET", "/docs", "this API's documentation"),
    ("GET", "/openapi.json", "the OpenAPI description"),
]
_STYLE = """body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#1d2433}
h1{font-size:1.5rem} code,pre{font-family:ui-monospace,monospace;background:#f2f4f8;border-radius:4px}
code{padding:0 .25rem} pre{padding:.6rem;overflow:auto} td{padding:.25rem .75rem .25rem 0;vertical-align:top}
.method{font-weight:700;color:#2456d3} details{margin:.4rem 0} summary{cursor:pointer}"""


def _page(title: str, body: str) -> str:
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<link rel="icon" href="/favicon.svg" type="image/svg+xml"><style>{_STYLE}</style></head>'
        f"<body>{body}</body></html>"
    )


def landing_page(model_name: str) -> str:
    rows = "".join(
        f'<tr><td class="method">{method}</td><td><code>{path}</code></td><td>{html.escape(text)}</td></tr>'
        for method, path, text in ENDPOINTS
    )
    return _page(
        f"{model_name} · glmkit",
        f"<h1>glmkit serving {html.escape(model_name)}</h1>"
        "<p>The chat page is off: start the server with <code>--web</code> to have it at /web/.</p>"
        f"<table>{rows}</table>"
        '<p>Details of every field: <a href="/docs">/docs</a>.</p>',
    )


# The documentation page renders /openapi.json itself: the usual Swagger UI loads its scripts from a CDN,
# which a machine without internet access (or a strict network) cannot reach.
_DOCS_SCRIPT = """
const esc = s => String(s ?? '').replace(/[&<>"]/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]));
const json = v => '<pre>' + esc(JSON.stringify(v, null, 2)) + '</pre>';
fetch('/openapi.json').then(r => r.json()).then(spec => {
  const schemas = (spec.components || {}).schemas || {};
  const resolve = s => s && s.$ref ? schemas[s.$ref.split('/').pop()] : s;
  let out = '';
  for (const [path, ops] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(ops)) {
      out += `<h2><span class="method">${method.toUpperCase()}</span> <code>${esc(path)}</code></h2>`;
      out += `<p>${esc(op.description || op.summary)}</p>`;
      const body = ((op.requestBody || {}).content || {})['application/json'];
      if (body) {
        const schema = resolve(body.schema);
        out += `<details><summary>Request body: ${esc(schema.title || '')}</summary>${json(schema)}</details>`;
      }
      const codes = Object.entries(op.responses || {})
        .map(([code, r]) => `<li><code>${code}</code> ${esc(r.description)}</li>`);
      out += `<details><summary>Responses</summary><ul>${codes.join('')}</ul></details>`;
    }
  }
  document.getElementById('api').innerHTML = out;
}).catch(e => { document.getElementById('api').textContent = 'cannot read /openapi.json: ' + e; });
"""


def docs_page(title: str) -> str:
    return _page(
        f"{title} · API docs",
        f'<h1>{html.escape(title)} HTTP API</h1><p>Generated from <a href="/openapi.json">/openapi.json</a>; '
        'the guide with examples is docs/http-api.md in the glmkit repository.</p>'
        f'<div id="api">Loading…</div><script>{_DOCS_SCRIPT}</script>',
    )


def _wants_html(request: Request) -> bool:
    return "text/html" in request.headers.get("accept", "")


def favicon() -> Response:
    return Response(FAVICON.read_bytes(), media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})


def router(model_name: str, web_path: str | None, api: bool) -> APIRouter:
    """``GET /``, the favicon and, with the API, ``/docs``.  ``web_path``: where the chat page is, if mounted."""
    pages = APIRouter(include_in_schema=False)
    pages.add_api_route("/favicon.ico", favicon, methods=["GET"])
    pages.add_api_route("/favicon.svg", favicon, methods=["GET"])
    if not api:
        return pages  # glmkit web: the page itself is at /

    @pages.get("/")
    async def root(request: Request) -> Response:
        if not _wants_html(request):  # an API client asking GET: the contract is POST
            raise APIError(405, "Method Not Allowed: POST / is the ChatGLM contract", headers={"Allow": "POST"})
        if web_path:
            return RedirectResponse(f"{web_path}/", status_code=307)
        return HTMLResponse(landing_page(model_name))

    @pages.get("/docs")
    async def docs() -> HTMLResponse:
        return HTMLResponse(docs_page("glmkit"))

    return pages
