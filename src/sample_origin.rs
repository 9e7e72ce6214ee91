//! A built-in stand-in for the legacy backend's `GET /download_batch_results/<lote_id>`:
//! it regenerates a deterministic OCR-results document on every call, after an artificial
//! delay, and counts generations. Used by `lotecache demo` and by the benchmarks.
//!
//! The id chooses the size: a suffix `-<N>kb` or `-<N>mb` (e.g. `LOTE-7-16mb`) pads the
//! document to about that many bytes; otherwise it is a few KB.

use crate::body::{full, ProxyBody};
use http::{header, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::net::TcpListener;

/// Generation counts, by lote id.
#[derive(Default)]
pub struct Generations(Mutex<HashMap<String, u64>>);

impl Generations {
    pub fn get(&self, id: &str) -> u64 {
        self.0.lock().expect("generations").get(id).copied().unwrap_or(0)
    }
    pub fn total(&self) -> u64 {
        self.0.lock().expect("generations").values().sum()
    }
    fn bump(&self, id: &str) {
        *self.0.lock().expect("generations").entry(id.to_string()).or_default() += 1;
    }
}

/// A running sample origin.
pub struct SampleOrigin {
    pub addr: SocketAddr,
    pub generations: Arc<Generations>,
}

/// Starts the sample origin on `listen` with the given generation delay.
pub async fn start(listen: SocketAddr, delay: Duration) -> std::io::Result<SampleOrigin> {
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let generations = Arc::new(Generations::default());
    let gens = generations.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let gens = gens.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| handle(req, gens.clone(), delay));
                let _ =
                    http1::Builder::new().timer(TokioTimer::new()).serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    Ok(SampleOrigin { addr, generations })
}

async fn handle(
    req: Request<Incoming>,
    gens: Arc<Generations>,
    delay: Duration,
) -> Result<Response<ProxyBody>, Infallible> {
    let path = req.uri().path();
    let Some(id) = path.strip_prefix("/download_batch_results/") else {
        // Any other path: generation counts, for benchmarks and the curious.
        let by_id = gens.0.lock().expect("generations").clone();
        let body = json!({ "service": "lotecache sample origin", "generations": gens.total(), "by_id": by_id });
        return Ok(json_response(StatusCode::OK, body.to_string(), None));
    };
    let id = id.to_string();
    gens.bump(&id);
    tokio::time::sleep(delay).await;
    let target = target_size(&id);
    let id2 = id.clone();
    let body = tokio::task::spawn_blocking(move || batch_document(&id2, target)).await.unwrap_or_default();
    Ok(json_response(StatusCode::OK, body, Some(&id)))
}

fn json_response(status: StatusCode, body: String, attachment: Option<&str>) -> Response<ProxyBody> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, "application/json".parse().expect("static"));
    if let Some(id) = attachment {
        if let Ok(v) = format!("attachment; filename={id}_resultados.json").parse() {
            resp.headers_mut().insert(header::CONTENT_DISPOSITION, v);
        }
    }
    resp
}

/// Size asked for by the id's suffix, in bytes (default 4 KB).
pub fn target_size(id: &str) -> usize {
    let lower = id.to_ascii_lowercase();
    let Some((_, suffix)) = lower.rsplit_once('-') else {
        return 4 * 1024;
    };
    let (num, mult) = if let Some(n) = suffix.strip_suffix("kb") {
        (n, 1024)
    } else if let Some(n) = suffix.strip_suffix("mb") {
        (n, 1024 * 1024)
    } else {
        return 4 * 1024;
    };
    num.parse::<usize>().map(|n| (n * mult).min(256 * 1024 * 1024)).unwrap_or(4 * 1024)
}

const WORDS: &[&str] = &[
    "factura",
    "importe",
    "total",
    "cliente",
    "fecha",
    "proveedor",
    "dirección",
    "código",
    "pago",
    "documento",
    "página",
    "firma",
    "contrato",
    "cláusula",
    "entrega",
    "pedido",
    "número",
    "cantidad",
    "descripción",
    "registro",
    "expediente",
    "resolución",
    "anexo",
    "sello",
    "vencimiento",
];

/// The results document of batch `id`, about `target` bytes, identical on every call.
pub fn batch_document(id: &str, target: usize) -> String {
    let mut seed = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let day = 1 + next() % 28;
    // Items are serialized straight into the output so the size is measured, not guessed.
    let mut items: Vec<u8> = Vec::with_capacity(target + 4096);
    let (mut count, mut pages_total) = (0u64, 0u64);
    while items.len() + 200 < target || count == 0 {
        count += 1;
        let pages = 1 + next() % 12;
        pages_total += pages;
        let words = 20 + (next() % 300) as usize;
        let text: Vec<&str> = (0..words).map(|_| WORDS[(next() % WORDS.len() as u64) as usize]).collect();
        if count > 1 {
            items.push(b',');
        }
        let item = json!({
            "lote_id": id,
            "nombre_archivo": format!("documento_{count:05}.pdf"),
            "paginas": pages,
            "texto_extraido": text.join(" "),
            "confianza": 0.80 + (next() % 2000) as f64 / 10_000.0,
            "idioma": "es",
            "tiempo_procesamiento_ms": 100 + next() % 5000,
        });
        serde_json::to_writer(&mut items, &item).expect("serializing to memory");
    }
    let metadata = json!({
        "lote_id": id,
        "fecha_creacion": format!("2025-07-{day:02}T09:00:00Z"),
        "fecha_procesamiento": format!("2025-07-{day:02}T09:42:17Z"),
        "total_archivos": count,
        "total_paginas": pages_total,
        "estado": "completado",
    });
    let mut out = format!("{{\"metadata\":{metadata},\"archivos_procesados\":[");
    out.push_str(std::str::from_utf8(&items).expect("serde_json writes UTF-8"));
    out.push_str("]}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_are_deterministic_and_sized_by_the_id() {
        assert_eq!(batch_document("A-256kb", target_size("A-256kb")), batch_document("A-256kb", 256 * 1024));
        let doc = batch_document("A-256kb", target_size("A-256kb"));
        assert!(doc.len() >= 256 * 1024 && doc.len() < 300 * 1024, "{}", doc.len());
        let v: serde_json::Value = serde_json::from_str(&doc).unwrap();
        assert_eq!(v["metadata"]["lote_id"], "A-256kb");
        assert!(v["archivos_procesados"].as_array().unwrap().iter().all(|f| f["lote_id"] == "A-256kb"));
        assert_eq!(target_size("plain"), 4096);
        assert_eq!(target_size("x-2mb"), 2 * 1024 * 1024);
    }
}
