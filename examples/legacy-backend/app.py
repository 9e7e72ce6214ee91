"""Stand-in for the legacy OCR platform's backend (CO-01): a Monitoring page with the
"Historial de Lotes" table, and the route behind its "Descargar JSON" button, which
regenerates the batch's whole results JSON from the database on every call, slowly, exactly
as the legacy code does. lotecache sits in front of it; the downloads themselves know nothing
about caching (what a backend adds for lotecache is described below).

    python seed.py && gunicorn -w 2 -b 127.0.0.1:5000 app:app

Downloads need a logged-in user with permission on the batch (GET /login?usuario=ana sets the
session; the seed gives ana every batch and luis only the first). GET /api/lotes/<id>/acceso
answers the same question for lotecache's access check: 204, 401 or 403.

What a real backend adds for lotecache, in a few lines: a download carrying the service token
(`X-Service-Token`, the value of LOTECACHE_SERVICE_TOKEN; lotecache sends it with its fills) is
allowed without a session, so lotecache can fetch a finished batch before anyone asks; and when
a batch reaches `completado` (POST /api/lotes/<id>/completar) or is processed again (POST
/api/lotes/<id>/reprocesar), lotecache's admin API is told (POST /warm, or POST /purge with
"rewarm"), so the first click is already a hit and a re-processed batch is generated once.
A failed call to lotecache never fails the backend's own work: it is logged, after a 2 s
timeout at most.

Environment: LEGACY_DB (SQLite file, default ./legacy.db), GEN_DELAY (seconds of artificial
generation work per download, default 1.0), SECRET_KEY (session signing key),
LOTECACHE_SERVICE_TOKEN (unset: no service access), LOTECACHE_ADMIN_URL and
LOTECACHE_ADMIN_TOKEN (lotecache's admin API; unset: nothing is told).
"""
import hmac
import json
import logging
import os
import sqlite3
import time
import urllib.request

from flask import Flask, Response, abort, jsonify, redirect, render_template, request, session

app = Flask(__name__)
app.secret_key = os.environ.get("SECRET_KEY", "legacy-sample-secret")
DB = os.environ.get("LEGACY_DB", "legacy.db")
GEN_DELAY = float(os.environ.get("GEN_DELAY", "1.0"))
SERVICE_TOKEN = os.environ.get("LOTECACHE_SERVICE_TOKEN", "")
ADMIN_URL = os.environ.get("LOTECACHE_ADMIN_URL", "").rstrip("/")
ADMIN_TOKEN = os.environ.get("LOTECACHE_ADMIN_TOKEN", "")
log = logging.getLogger("legacy")


def db():
    conn = sqlite3.connect(DB, timeout=10)
    conn.row_factory = sqlite3.Row
    return conn


def get_batch_data(lote_id):
    """Queries the batch and its processed files (the legacy 'internal source')."""
    with db() as conn:
        lote = conn.execute("SELECT * FROM lotes WHERE lote_id = ?", (lote_id,)).fetchone()
        if lote is None:
            return None
        files = conn.execute("SELECT * FROM archivos WHERE lote_id = ? ORDER BY rowid", (lote_id,)).fetchall()
        # Every generation is counted, so tests can see how often the work was redone.
        conn.execute("INSERT INTO generaciones VALUES (?, 1) "
                     "ON CONFLICT(lote_id) DO UPDATE SET n = n + 1", (lote_id,))
    return lote, files


def build_json_from_data(data):
    """Compiles the results JSON: metadata plus every processed file, each with its lote_id."""
    lote, files = data
    time.sleep(GEN_DELAY)  # stands in for the expensive part of the real generation
    document = {
        "metadata": {
            "lote_id": lote["lote_id"],
            "fecha_creacion": lote["fecha_creacion"],
            "fecha_procesamiento": lote["fecha_procesamiento"],
            "total_archivos": len(files),
            "total_paginas": sum(f["paginas"] for f in files),
            "estado": lote["estado"],
        },
        "archivos_procesados": [
            {
                "lote_id": f["lote_id"],
                "nombre_archivo": f["nombre_archivo"],
                "paginas": f["paginas"],
                "texto_extraido": f["texto_extraido"],
                "confianza": f["confianza"],
                "idioma": f["idioma"],
            }
            for f in files
        ],
    }
    return json.dumps(document, ensure_ascii=False, indent=2)


def access(lote_id):
    """(status, message) of the session user's access to a batch: 204 allowed, 401, 403.
    lotecache itself, with the service token, may fetch any batch."""
    given = request.headers.get("X-Service-Token", "")
    if SERVICE_TOKEN and hmac.compare_digest(given.encode(), SERVICE_TOKEN.encode()):
        return 204, ""
    usuario = session.get("usuario")
    if not usuario:
        return 401, "inicie sesión para descargar resultados"
    with db() as conn:
        allowed = conn.execute("SELECT 1 FROM permisos WHERE usuario = ? AND lote_id = ?",
                               (usuario, lote_id)).fetchone()
    return (204, "") if allowed else (403, f"{usuario} no tiene acceso al lote {lote_id}")


def refusal(status, message):
    return jsonify({"error": "acceso denegado", "detail": message}), status


@app.route("/api/lotes/<string:lote_id>/acceso")
def acceso(lote_id):
    """The access check lotecache asks before serving a saved batch."""
    status, message = access(lote_id)
    return ("", 204) if status == 204 else refusal(status, message)


def tell_lotecache(path, payload):
    """POSTs to lotecache's admin API; a failure is logged, never raised."""
    if not ADMIN_URL:
        return "not-configured"
    req = urllib.request.Request(f"{ADMIN_URL}{path}", data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json",
                                          "Authorization": f"Bearer {ADMIN_TOKEN}"})
    try:
        with urllib.request.urlopen(req, timeout=2) as r:
            r.read()
        return "sent"
    except Exception as e:  # the backend's own work is done: this is only a hint to the cache
        log.warning("telling lotecache %s failed: %s", path, e)
        return "failed"


def processed(lote_id, reprocess):
    """Marks a batch processed (again): its results change, and lotecache is told."""
    status, message = access(lote_id)
    if status != 204:
        return refusal(status, message)
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    with db() as conn:
        found = conn.execute("UPDATE lotes SET estado = 'completado', fecha_procesamiento = ? WHERE lote_id = ?",
                             (now, lote_id)).rowcount
        if reprocess:
            # A second OCR pass: every file's confidence is recomputed.
            conn.execute("UPDATE archivos SET confianza = round(min(0.9999, confianza + 0.0001), 4) WHERE lote_id = ?",
                         (lote_id,))
    if not found:
        abort(404)
    if reprocess:
        told = tell_lotecache("/purge", {"lote_id": lote_id, "rewarm": True})
    else:
        told = tell_lotecache("/warm", {"lote_id": lote_id})
    return jsonify({"lote_id": lote_id, "estado": "completado", "fecha_procesamiento": now, "lotecache": told})


@app.route("/api/lotes/<string:lote_id>/completar", methods=["POST"])
def completar(lote_id):
    """The batch's processing ended: mark it completado and have lotecache fetch it."""
    return processed(lote_id, reprocess=False)


@app.route("/api/lotes/<string:lote_id>/reprocesar", methods=["POST"])
def reprocesar(lote_id):
    """The batch was processed again: its new results replace the saved ones, fetched once."""
    return processed(lote_id, reprocess=True)


@app.route("/login")
def login():
    session["usuario"] = request.args.get("usuario", "")
    return redirect("/monitoreo")


@app.route("/download_batch_results/<string:lote_id>", methods=["GET"])
def download_batch_results(lote_id):
    status, message = access(lote_id)
    if status != 204:
        return refusal(status, message)
    data = get_batch_data(lote_id)
    if data is None:
        abort(404)
    body = build_json_from_data(data)
    return Response(body, mimetype="application/json",
                    headers={"Content-Disposition": f"attachment; filename={lote_id}_resultados.json"})


@app.route("/monitoreo")
def monitoreo():
    with db() as conn:
        lotes = conn.execute(
            "SELECT l.lote_id, l.fecha_creacion, l.estado, COUNT(a.rowid) AS archivos "
            "FROM lotes l LEFT JOIN archivos a ON a.lote_id = l.lote_id "
            "GROUP BY l.lote_id ORDER BY l.lote_id").fetchall()
    return render_template("monitoreo.html", lotes=lotes, usuario=session.get("usuario"))


@app.route("/api/generaciones")
def generaciones():
    """How many times each batch's JSON was generated (for tests and curious operators)."""
    with db() as conn:
        rows = conn.execute("SELECT lote_id, n FROM generaciones").fetchall()
    return jsonify({r["lote_id"]: r["n"] for r in rows})


@app.route("/")
def index():
    return '<a href="/monitoreo">Monitoreo</a>'
