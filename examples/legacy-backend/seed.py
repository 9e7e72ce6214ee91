"""Creates and fills the legacy backend's SQLite database: batches, their processed files,
and the generation counter. Deterministic: the same database every time.

    python seed.py [path/to/legacy.db]        (default: $LEGACY_DB or ./legacy.db)
"""
import os
import random
import sqlite3
import sys

WORDS = ("factura importe total cliente fecha proveedor dirección código pago documento página "
         "firma contrato cláusula entrega pedido número cantidad descripción registro expediente "
         "resolución anexo sello vencimiento").split()

# (lote_id, fecha, estado, number of files, words per file)
BATCHES = [
    ("LOTE-2025-07-001", "2025-07-14", "completado", 12, 120),
    ("LOTE-2025-07-002", "2025-07-15", "completado", 40, 300),
    ("LOTE-2025-07-003", "2025-07-16", "completado", 900, 400),  # about 3 MB of results
    ("LOTE-2025-07-004", "2025-07-16", "completado", 5, 80),
    ("LOTE-2025-07-005", "2025-07-17", "en_proceso", 8, 100),
    ("LOTE-2025-07-006", "2025-07-17", "en_proceso", 3, 60),
]


def seed(path):
    if os.path.exists(path):
        os.remove(path)
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE lotes (lote_id TEXT PRIMARY KEY, fecha_creacion TEXT, fecha_procesamiento TEXT,
                            estado TEXT NOT NULL);
        CREATE TABLE archivos (lote_id TEXT NOT NULL REFERENCES lotes(lote_id), nombre_archivo TEXT,
                               paginas INTEGER, texto_extraido TEXT, confianza REAL, idioma TEXT);
        CREATE TABLE generaciones (lote_id TEXT PRIMARY KEY, n INTEGER NOT NULL);
        CREATE TABLE permisos (usuario TEXT NOT NULL, lote_id TEXT NOT NULL, PRIMARY KEY (usuario, lote_id));
    """)
    rng = random.Random(20250716)
    for lote_id, fecha, estado, files, words in BATCHES:
        procesado = f"{fecha}T10:{rng.randrange(60):02d}:00" if estado == "completado" else None
        db.execute("INSERT INTO lotes VALUES (?, ?, ?, ?)", (lote_id, f"{fecha}T09:00:00", procesado, estado))
        for i in range(1, files + 1):
            text = " ".join(rng.choice(WORDS) for _ in range(words))
            db.execute("INSERT INTO archivos VALUES (?, ?, ?, ?, ?, ?)",
                       (lote_id, f"escaneo_{i:04d}.pdf", rng.randint(1, 12), text,
                        round(rng.uniform(0.8, 0.99), 4), "es"))
    # ana may see every batch; luis only the first one.
    for lote_id, *_ in BATCHES:
        db.execute("INSERT INTO permisos VALUES ('ana', ?)", (lote_id,))
    db.execute("INSERT INTO permisos VALUES ('luis', ?)", (BATCHES[0][0],))
    db.commit()
    db.close()


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("LEGACY_DB", "legacy.db")
    seed(target)
    print(f"seeded {target}: {len(BATCHES)} batches")
