//! The smallest pass-through proxy hyper and tokio allow: no routing, no header rewriting, no
//! timeouts, no pool; one origin connection per request, as the legacy app's gunicorn sync
//! workers force anyway. `bench/passthrough.sh` measures lotecache against it to tell the
//! cost of lotecache's own code from the cost of the stack it is built on.
//!
//! cargo run --release --example hyper_floor -- --listen 127.0.0.1:8081 --origin 127.0.0.1:5000 [--preconnect]
//!
//! `--preconnect` keeps one origin connection opened ahead of the next request (the idea
//! being to take the connect off the request's path); the script measures whether it helps.

use bytes::Bytes;
use clap::Parser;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt};
use hyper::{body::Incoming, Request, Response};
use hyper_util::rt::TokioIo;
use std::{cell::RefCell, net::SocketAddr};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    listen: SocketAddr,
    #[arg(long)]
    origin: SocketAddr,
    /// Keep one origin connection open ahead of the next request.
    #[arg(long)]
    preconnect: bool,
}

thread_local! {
    /// The connection opened ahead (`--preconnect`); the runtime has one thread.
    static SPARE: RefCell<Option<TcpStream>> = const { RefCell::new(None) };
}

type Body = UnsyncBoxBody<Bytes, hyper::Error>;

async fn origin_connection(origin: SocketAddr, preconnect: bool) -> std::io::Result<TcpStream> {
    let spare = SPARE.with(|s| s.borrow_mut().take());
    if preconnect {
        tokio::task::spawn_local(async move {
            if let Ok(s) = TcpStream::connect(origin).await {
                SPARE.with(|slot| *slot.borrow_mut() = Some(s));
            }
        });
    }
    let stream = match spare {
        Some(s) => s,
        None => TcpStream::connect(origin).await?,
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}

async fn forward(mut req: Request<Incoming>, args: &'static Args) -> Result<Response<Body>, hyper::Error> {
    let stream = match origin_connection(args.origin, args.preconnect).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("origin connect: {e}");
            let body = http_body_util::Empty::new().map_err(|never| match never {}).boxed_unsync();
            return Ok(Response::builder().status(502).body(body).expect("static response"));
        }
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::task::spawn_local(conn);
    // Origin-form target: the client may have sent an absolute one.
    let target = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/").parse().expect("a valid path");
    *req.uri_mut() = target;
    let mut resp = sender.send_request(req).await?;
    // Hop-by-hop: the origin's `Connection: close` is about the origin connection; forwarded,
    // it would make hyper close the client's keep-alive connection too.
    resp.headers_mut().remove(hyper::header::CONNECTION);
    Ok(resp.map(BodyExt::boxed_unsync))
}

fn main() {
    let args: &'static Args = Box::leak(Box::new(Args::parse()));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    tokio::task::LocalSet::new().block_on(&runtime, async move {
        let listener = TcpListener::bind(args.listen).await.expect("listen");
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let _ = stream.set_nodelay(true);
            tokio::task::spawn_local(async move {
                let service = hyper::service::service_fn(move |req| forward(req, args));
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
}
