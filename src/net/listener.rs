//! The shard's accept loop and the per-shard connection cap.

use std::rc::Rc;

use futures::future::{select, Either};
use futures_lite::AsyncWriteExt;
use glommio::net::{TcpListener, TcpStream};

use super::connection;
use crate::http::response::write_json_error;
use crate::shard::Shard;

/// Accepts connections until the shard starts shutting down.
pub async fn accept_loop(shard: Rc<Shard>, listener: TcpListener, surface: super::Surface) {
    loop {
        let accepted = {
            let accept = Box::pin(listener.accept());
            let stop = Box::pin(shard.shutdown.wait());
            match select(accept, stop).await {
                Either::Left((accepted, _)) => accepted,
                Either::Right(_) => return,
            }
        };
        let stream = match accepted {
            Ok(s) => s,
            Err(e) => {
                // EMFILE/ENFILE and friends: keep the listener and the existing connections;
                // back off briefly so a descriptor shortage doesn't spin the core.
                tracing::warn!(shard = shard.id, error = %e, "accept failed");
                glommio::timer::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        if !shard.try_open_connection() {
            glommio::spawn_local(refuse(shard.clone(), stream)).detach();
            continue;
        }
        let Ok(pass) = shard.gate.enter() else {
            shard.close_connection();
            return;
        };
        let conn_shard = shard.clone();
        glommio::spawn_local(async move {
            connection::serve(&conn_shard, stream, surface).await;
            conn_shard.close_connection();
            drop(pass);
        })
        .detach();
    }
}

/// Answers a connection over the shard's limit with 503 and closes it, so the client gets a
/// clear error instead of a connection that hangs in the backlog.
async fn refuse(shard: Rc<Shard>, mut stream: TcpStream) {
    let mut out = bytes::BytesMut::with_capacity(256);
    shard.with_date(|date| {
        write_json_error(
            &mut out,
            date,
            503,
            "SERVICE_UNAVAILABLE",
            "too many connections to this relay shard; retry shortly",
            false,
            false,
            &[("Retry-After", "1")],
        )
    });
    let _ = stream.write_all(&out).await;
    let _ = stream.close().await;
}
