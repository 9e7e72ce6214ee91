"""Builds batch results documents in the legacy layout from real Spanish prose, with OCR-like
noise, for bench/compression.sh.

Sources: the Spanish manual pages (Debian package manpages-es: groff, markup stripped) and the
Debian Reference in Spanish (debian-reference-es: its plain-text edition, tables dropped),
extracted by the caller into SRC. Together they hold about 3.5 MB of prose, split here into
sentences.

A document is what the legacy backend's build_json_from_data writes (json.dumps with
ensure_ascii=False, indent=2): "metadata" and "archivos_procesados", one entry per processed
file with lote_id, nombre_archivo, paginas, texto_extraido, confianza and idioma. Each page's
text is 8-30 sentences drawn at random from the pool (seeded by the batch id), so a large
document repeats sentences but never long runs of them. OCR noise, on 6 % of the words: one
of the confusions OCR engines make (l/1, O/0, rn/m, c/e, S/5, B/8, accents dropped or added,
ñ read as n), a word split in two or two words run together, a stray mark (· ' ,), a word
hyphenated across a line break; plus, per page, a header with the page number, a date and an
amount, as scanned invoices carry.

Usage: python3 bench/spanish_corpus.py SRC OUT_DIR ID:BYTES [ID:BYTES ...]
"""
import gzip
import json
import pathlib
import random
import re
import sys

CONFUSIONS = [("l", "1"), ("1", "l"), ("O", "0"), ("0", "O"), ("rn", "m"), ("m", "rn"), ("c", "e"), ("e", "c"),
              ("S", "5"), ("B", "8"), ("á", "a"), ("é", "e"), ("í", "i"), ("ó", "o"), ("ú", "u"), ("ñ", "n"),
              ("a", "á"), ("i", "í"), ("o", "ó")]


def groff_text(raw):
    out = []
    for line in raw.splitlines():
        if line.startswith((".", "'", '\\"')):
            # A macro line; keep the text of .B/.I/.SH-style lines.
            m = re.match(r"^\.(?:B|I|BI|BR|IR|RB|RI|IB|SH|SS|TP|IP)\s+(.*)$", line)
            if not m:
                continue
            line = m.group(1).replace('"', "")
        line = re.sub(r"\\f[BIRP]|\\f\(..|\\\*\(..|\\\*.|\\s[-+]?\d|\\&|\\e|\\-|\\\(..|\\.", lambda x: "-" if x.group(0) == "\\-" else "", line)
        out.append(line)
    return " ".join(out)


def reference_text(raw):
    keep = []
    for line in raw.splitlines():
        s = line.strip()
        if not s or "|" in s or s.startswith(("+-", "$ ", "# ")) or s.count("-") > 10:
            keep.append("\n")
            continue
        keep.append(s)
    return " ".join(keep)


def sentences(src):
    text = []
    for f in sorted(p for p in src.rglob("*.gz") if p.is_file()):
        raw = gzip.open(f, "rt", encoding="utf-8", errors="replace").read()
        if "/man/" in str(f):
            text.append(groff_text(raw))
        elif f.name.endswith(".txt.gz"):
            text.append(reference_text(raw))
    pool = []
    for chunk in text:
        for s in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", chunk)):
            s = s.strip()
            # Prose: long enough, mostly letters, not a command line or a path list.
            letters = sum(c.isalpha() or c == " " for c in s)
            if 40 <= len(s) <= 400 and letters > 0.85 * len(s):
                pool.append(s)
    return pool


def noisy(word, rng):
    r = rng.random()
    if r < 0.55:
        for a, b in rng.sample(CONFUSIONS, len(CONFUSIONS)):
            if a in word:
                return word.replace(a, b, 1)
        return word
    if r < 0.70 and len(word) > 3:
        i = rng.randrange(1, len(word) - 1)
        return word[:i] + " " + word[i:]
    if r < 0.80:
        return word + rng.choice(["·", "'", ","])
    if len(word) > 5:
        i = rng.randrange(2, len(word) - 2)
        return word[:i] + "-\n" + word[i:]
    return word


def page_text(pool, rng, page, day):
    header = f"Página {page} — {day:02d}/07/2025 — Importe: {rng.randrange(10, 99999)},{rng.randrange(100):02d} EUR"
    words = " ".join(rng.choice(pool) for _ in range(rng.randrange(8, 31))).split(" ")
    words = [noisy(w, rng) if rng.random() < 0.06 else w for w in words]
    return header + "\n" + " ".join(words)


def document(lote_id, target, pool):
    rng = random.Random(lote_id)
    day = rng.randrange(1, 29)
    files, size, n = [], 0, 0
    while size < target or not files:
        n += 1
        pages = rng.randrange(1, 13)
        texts = [page_text(pool, rng, p, day) for p in range(1, pages + 1)]
        item = {"lote_id": lote_id, "nombre_archivo": f"factura_{n:05d}.pdf", "paginas": pages,
                "texto_extraido": "\n\f".join(texts), "confianza": round(rng.uniform(0.80, 0.99), 2), "idioma": "es"}
        size += len(json.dumps(item, ensure_ascii=False, indent=2).encode()) + 8
        files.append(item)
    doc = {
        "metadata": {"lote_id": lote_id, "fecha_creacion": f"2025-07-{day:02d}",
                     "fecha_procesamiento": f"2025-07-{day:02d}T10:00:00", "total_archivos": len(files),
                     "total_paginas": sum(f["paginas"] for f in files), "estado": "completado"},
        "archivos_procesados": files,
    }
    return json.dumps(doc, ensure_ascii=False, indent=2).encode()


def main():
    src, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    pool = sentences(src)
    print(f"corpus: {len(pool)} sentences, {sum(len(s.encode()) for s in pool) / 1e6:.1f} MB of prose", file=sys.stderr)
    for spec in sys.argv[3:]:
        lote_id, size = spec.split(":")
        body = document(lote_id, int(size), pool)
        (out / lote_id).write_bytes(body)
        print(f"{lote_id}: {len(body)} bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
