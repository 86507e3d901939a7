//! Serving a router on a listener: one HTTP/1.1 connection per accepted stream, with upgrades
//! (the WebSocket transport) and graceful shutdown.
//!
//! Hand-written around hyper instead of `axum::serve` because axum's gives hyper no timer, and
//! without one hyper reads request headers for as long as a client cares to send them: a
//! slow-loris client (a byte every few seconds) would hold a connection and its task forever.
//! Here the headers of each request must arrive within `header_read_timeout` (`limits.header_read_timeout_secs`; counted from the connection's
//! start, or from the end of the previous response on a kept-alive connection); the body is
//! bounded in time by `middleware::buffer_body`, and the handler by the request deadline.

use std::{future::Future, net::SocketAddr, time::Duration};

use axum::{Router, extract::ConnectInfo, serve::Listener};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::watch;
use tower::ServiceExt;

/// Serves `app` on `listener` until `shutdown` resolves, then lets the connections finish what
/// they are doing (hyper's graceful shutdown: no new requests, idle ones closed) and returns
/// once they have. With `connect_info`, each request carries the peer's address as axum's
/// `ConnectInfo<SocketAddr>`.
pub async fn serve<L>(
    mut listener: L,
    app: Router,
    connect_info: bool,
    header_read_timeout: Duration,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()>
where
    L: Listener<Addr = SocketAddr>,
{
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (io, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
            // Reap finished connection tasks so the set does not grow with the server's age.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let app = app.clone();
        let mut stop = stop_rx.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |mut request: http::Request<Incoming>| {
                if connect_info {
                    request.extensions_mut().insert(ConnectInfo(peer));
                }
                app.clone().oneshot(request.map(axum::body::Body::new))
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(header_read_timeout);
            let connection = builder.serve_connection(TokioIo::new(io), service).with_upgrades();
            tokio::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(err) = result {
                        tracing::debug!(%peer, %err, "connection ended with an error");
                    }
                    return;
                }
                _ = stop.wait_for(|stop| *stop) => {}
            }
            connection.as_mut().graceful_shutdown();
            if let Err(err) = connection.await {
                tracing::debug!(%peer, %err, "connection ended with an error while shutting down");
            }
        });
    }
    let _ = stop_tx.send(true);
    while connections.join_next().await.is_some() {}
    Ok(())
}
